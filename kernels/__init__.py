"""Triton kernels and their launchers, installed as ``fused_lora.kernels`` (no autograd, no nn.Module here).

Run from a source checkout, the repository root is on ``sys.path`` and this folder would also be importable as a
top-level ``kernels``, shadowing the unrelated PyPI package of that name that bitsandbytes imports. When imported
under that name it steps aside: it loads the real ``kernels`` from the rest of ``sys.path``, or raises the
ImportError an environment without that package would raise.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError(
            "No module named 'kernels' (this checkout's kernels/ folder is fused_lora.kernels)", name="kernels"
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
