"""LTO-link objects (host .o with embedded LTO IR) with nvJitLink, to a cubin (or PTX with --ptx).
usage: nvjitlink_link.py LIB OUT OPT,OPT,... IN.o [IN.o ...]"""
import ctypes, sys, time
lib, out, opts, *inputs = sys.argv[1:]
L = ctypes.CDLL(lib)
opts = [o.encode() for o in opts.split(",")]
h = ctypes.c_void_p()
def chk(rc, what):
    if rc:
        n = ctypes.c_size_t(); L.nvJitLinkGetErrorLogSize(h, ctypes.byref(n)); b = ctypes.create_string_buffer(n.value + 1)
        L.nvJitLinkGetErrorLog(h, b); print(f"{what} failed rc={rc}\n{b.value.decode(errors='replace')[:3000]}"); sys.exit(1)
t0 = time.time()
chk(L.nvJitLinkCreate(ctypes.byref(h), len(opts), (ctypes.c_char_p * len(opts))(*opts)), "create")
for f in inputs:
    chk(L.nvJitLinkAddFile(h, 10, f.encode()), f"add {f}")   # NVJITLINK_INPUT_ANY
chk(L.nvJitLinkComplete(h), "complete")
ptx = b"-ptx" in opts
n = ctypes.c_size_t()
(L.nvJitLinkGetLinkedPtxSize if ptx else L.nvJitLinkGetLinkedCubinSize)(h, ctypes.byref(n))
b = ctypes.create_string_buffer(n.value)
(L.nvJitLinkGetLinkedPtx if ptx else L.nvJitLinkGetLinkedCubin)(h, b)
open(out, "wb").write(b.raw.rstrip(b"\0") if ptx else b.raw)
n2 = ctypes.c_size_t(); L.nvJitLinkGetInfoLogSize(h, ctypes.byref(n2)); b2 = ctypes.create_string_buffer(n2.value + 1); L.nvJitLinkGetInfoLog(h, b2)
print(b2.value.decode(errors="replace")[-2000:])
print(f"nvJitLink {lib.split('/')[-1]} {' '.join(o.decode() for o in opts)}: {time.time() - t0:.1f} s")
