#!/usr/bin/env bash
# Builds .unsloth/site.tar.xz for bench/unsloth_rows.py: Unsloth, and what it imports that the GPU
# machine's image lacks, for that machine's Python 3.12 on x86-64, pruned so that it travels within
# the GPU machine's 64 MiB carry (about 15 MB). The versions are the ones the bench ran (round 11);
# Unsloth 2026.10.9 pins TRL <= 1.15 and datasets < 5, which is why they differ from the TRL rows'.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${target[@]}" -d "$work/wheels" \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 xformers==0.0.35 bitsandbytes==0.50.2 datasets==4.8.5 trl==1.15.0 \
  torchao==0.18.0 diffusers==0.42.1 cut_cross_entropy==25.1.1 tyro==1.0.17 docstring_parser==0.18.0 \
  shtab==1.13.0 typeguard==4.6.1 msgspec==0.23.0 structlog==26.1.0 json5==0.17.3 nest_asyncio==1.6.0 \
  pydantic==2.14.4 pydantic_core==2.50.5 typing_inspection==0.4.5 annotated_types==0.8.0
python3 -m pip install -q --no-deps --no-compile "${target[@]}" --target "$work/site" "$work"/wheels/*.whl
rm -rf "$work/site/studio" "$work/site/bin"  # Unsloth Studio's web app (82 MB): not used to train
# bitsandbytes ships a library per CUDA version: keep the CPU one and CUDA 13.0's (the GPU machine's)
find "$work/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .unsloth
tar cJf .unsloth/site.tar.xz -C "$work/site" .
ls -l .unsloth/site.tar.xz
