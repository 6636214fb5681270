"""Command-line tools: conversion, generation, serving and benchmarks."""
