#!/bin/bash
# Step 5: SASS and resource usage, baseline versus LTO link
export PATH=/tmp/lto/tools/nvidia/cu13/bin:$PATH   # cuobjdump/nvdisasm 13.2 from PyPI (not in this toolkit)
cd /tmp/lto/study/out
for f in "$@"; do
  cuobjdump -sass $f > $f.sass 2>&1
  cuobjdump -res-usage $f > $f.res 2>&1
  echo "== $f: $(grep -cE '^\s+/\*[0-9a-f]+\*/' $f.sass) SASS lines, CALL: $(grep -c 'CALL' $f.sass), MUFU.TANH: $(grep -c 'MUFU.TANH' $f.sass), STL: $(grep -c 'STL' $f.sass), LDL: $(grep -c 'LDL' $f.sass)"
  grep -E "Function|REG|STACK" $f.res | sed 's/^/   /'
done
