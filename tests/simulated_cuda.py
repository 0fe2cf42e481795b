"""A CPU-only stand-in for a CUDA device, to find host/device tensor mixes without a GPU (a
regression once handed FlashInfer's plan() a host qo_indptr beside device tables, which only a
real GPU showed).

Tensors "on cuda" are CPU tensors of the marker subclass Dev; a TorchFunctionMode routes every
torch call: device="cuda" / .to("cuda") / .cuda() give Dev, .cpu() / .to("cpu") give plain tensors,
.device of a Dev says cuda, and an op that mixes a Dev tensor with a plain CPU tensor of one or
more dimensions raises as CUDA torch does ("Expected all tensors to be on the same device"),
except the cross-device copies (copy_, to) and a CUDA tensor indexed by CPU indices, which torch
allows. .numpy() of a Dev tensor raises as torch does for a CUDA tensor."""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


class Dev(torch.Tensor):
    __torch_function__ = torch._C._disabled_torch_function_impl


def _dev_of(d):
    if d is None or isinstance(d, (torch.dtype, bool)):
        return None
    if isinstance(d, torch.Tensor):
        return CUDA if isinstance(d, Dev) else CPU
    if isinstance(d, (str, torch.device, int)) and not isinstance(d, bool):
        try:
            return CUDA if torch.device(d).type == "cuda" else CPU
        except Exception:
            return None
    return None


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, Dev) else t


ALLOWED_MIX = {torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda}
log = []


class SimCuda(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        attr = getattr(getattr(func, "__self__", None), "__name__", None) if getattr(func, "__name__", "") == "__get__" else None
        if attr == "device":
            return CUDA if isinstance(args[0], Dev) else CPU
        if attr == "is_cuda":
            return isinstance(args[0], Dev)
        if attr is not None:
            out = func(*tree_map(_plain, args))
            return out.as_subclass(Dev) if isinstance(out, torch.Tensor) and isinstance(args[0], Dev) else out
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        any_dev = any(isinstance(t, Dev) for t in tensors)
        target = None
        if "device" in kwargs:
            target = _dev_of(kwargs["device"])
            if target is not None:
                kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            rest = list(args[1:])
            for i, a in enumerate(rest):
                d = _dev_of(a) if not isinstance(a, torch.Tensor) else (CUDA if isinstance(a, Dev) else CPU)
                if d is not None and not isinstance(a, torch.dtype):
                    target = d
                    if not isinstance(a, torch.Tensor):
                        rest[i] = "cpu"
            args = (args[0], *rest)
            if target is None:
                target = CUDA if isinstance(args[0], Dev) else CPU
        elif func is torch.Tensor.cpu:
            target = CPU
        elif func is torch.Tensor.cuda:
            target = CUDA
        elif func is torch.Tensor.numpy and isinstance(args[0], Dev):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first.")
        elif func not in ALLOWED_MIX and any_dev:
            name = getattr(func, "__name__", str(func))
            if name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
                self_dev = isinstance(args[0], Dev)
                idx = [t for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor)]
                if not self_dev and any(isinstance(t, Dev) for t in idx):
                    raise RuntimeError(f"[simcuda] {name}: a CPU tensor indexed by CUDA indices")
            else:
                plain_nd = [t for t in tensors if not isinstance(t, Dev) and t.dim() > 0]
                if plain_nd:
                    raise RuntimeError(f"[simcuda] Expected all tensors to be on the same device, but found at least "
                                       f"two devices, cuda:0 and cpu! ({name})")
        out = func(*tree_map(_plain, args), **tree_map(_plain, kwargs))
        if target is None:
            target = CUDA if any_dev else CPU
            if getattr(func, "__name__", "") in ("__getitem__",) and not isinstance(args[0], Dev):
                target = CPU
        if target == CUDA:
            out = tree_map(lambda t: t.as_subclass(Dev) if isinstance(t, torch.Tensor) and not isinstance(t, Dev)
                           else t, out)
        elif func in (torch.Tensor.cpu, torch.Tensor.to):
            out = tree_map(_plain, out)
        return out


def simulated_cuda():
    """The mode as a context (with torch.cuda.is_available patched by the caller)."""
    return SimCuda()
