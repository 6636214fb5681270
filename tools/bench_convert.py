"""Peak host memory of `meshserve convert` on a ~500 MB model.

    python -m meshserve.tools.bench_convert [--out bench/convert.json]

Saves a random ~134M-parameter Llama (f32, ~536 MB of safetensors) with transformers,
then runs the converter in a child process and reports its peak RSS next to the largest
tensor and the whole model, and the RSS of a child that only imports the same modules.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from meshserve.tools.bench_engine import LLAMA_125M
from meshserve.tools.reports import write_json

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child of this
# (large) process would report the parent's peak.
_CHILD = """
from meshserve.tools.convert import convert
if {run!r}:
    convert({src!r}, {dst!r}, progress=False)
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")))
"""


def _peak_rss(src: str, dst: str, run: bool) -> int:
    code = _CHILD.format(src=src, dst=dst, run=run)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_125M))
        src = os.path.join(tmp, "hf")
        model.save_pretrained(src)
        largest = max(p.numel() * p.element_size() for p in model.parameters())
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
        baseline = _peak_rss(src, os.path.join(tmp, "unused"), run=False)
        start = time.perf_counter()
        peak = _peak_rss(src, os.path.join(tmp, "ckpt"), run=True)
        seconds = time.perf_counter() - start
    mib = lambda n: n / 2**20  # noqa: E731
    result = {"model_bytes": total, "largest_tensor_bytes": largest,
              "import_only_peak_rss": baseline, "convert_peak_rss": peak,
              "convert_extra_rss": peak - baseline, "seconds": seconds}
    print(f"model {mib(total):.0f} MiB, largest tensor {mib(largest):.0f} MiB")
    print(f"peak RSS: imports only {mib(baseline):.0f} MiB, convert {mib(peak):.0f} MiB "
          f"(+{mib(peak - baseline):.0f} MiB over imports) in {seconds:.1f} s")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
