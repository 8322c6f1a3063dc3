# Sourced on the lent GPU machine (`. bench/on_gpu.sh [--bnb]`) before a bench command: installs the
# carried wheels (.whl: liger-kernel, TRL, datasets, ...) into /tmp/site, unpacks Unsloth's site folder
# (.unsloth/site.tar.xz, from bench/unsloth_site.sh) where it was carried, and puts /tmp/site and src/
# first on the path. --bnb also puts that folder's bitsandbytes on the path (the QLoRA rows); the
# 16-bit rows run without it, as users without bitsandbytes would. bench/README.md says what to carry.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 || echo "on_gpu.sh: installing .whl/*.whl failed" >&2
fi
if [ -f .unsloth/site.tar.xz ] && [ ! -d .unsloth/site/unsloth ]; then
  mkdir -p .unsloth/site && tar xJf .unsloth/site.tar.xz -C .unsloth/site
fi
if [ "${1:-}" = "--bnb" ]; then
  if [ -d .unsloth/site/bitsandbytes ]; then cp -r .unsloth/site/bitsandbytes* /tmp/site/;
  else echo "on_gpu.sh: --bnb needs .unsloth/site.tar.xz carried" >&2; fi
fi
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
