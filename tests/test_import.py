"""`import fused_lora` must not initialise CUDA, need the compiled extension or pull in heavy optional deps."""

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_touches_no_cuda_extension_or_optional_dependency():
    out = _run(
        """
        import sys, torch
        import fused_lora, fused_lora.functional, fused_lora.modules, fused_lora.nf4, fused_lora.peft
        heavy = [m for m in ("fused_lora._C", "triton", "bitsandbytes", "peft", "transformers") if m in sys.modules]
        print(torch.cuda.is_initialized(), heavy)
        """
    )
    assert out == "False []"


def test_import_works_when_the_extension_cannot_load():
    out = _run(
        """
        import sys
        sys.modules["fused_lora._C"] = None  # make `import fused_lora._C` fail as on a build without it
        import fused_lora
        print(fused_lora.FusedLoraLinear.__name__, fused_lora.quantize_nf4.__name__)
        """
    )
    assert out == "FusedLoraLinear quantize_nf4"


def test_transformers_and_peft_import_from_the_checkout_root():
    """`python -m ...` puts the checkout root first on sys.path; nothing there may shadow a PyPI package
    (a top-level kernels/ folder once made transformers believe the PyPI `kernels` package was installed)."""
    repo_root = __import__("pathlib").Path(__file__).resolve().parents[1]
    out = _run(
        f"""
        import importlib.util, sys
        sys.path.insert(0, {str(repo_root)!r})
        spec = importlib.util.find_spec("kernels")
        print(spec is None or {str(repo_root)!r} not in str(spec.origin or spec.submodule_search_locations))
        import transformers.modeling_utils, peft
        from transformers import LlamaConfig
        print("imported")
        """
    )
    assert out.split() == ["True", "imported"]


# ---------------------------------------------------------------------------------------- the tooling
# (the import layers themselves are checked by tests/test_layers.py)


def test_the_benchmarked_implementations_import_neither_the_end_to_end_bench_nor_peft_or_bitsandbytes():
    out = _run(
        """
        import sys
        import fused_lora.bench.impls
        print("fused_lora.bench.e2e" in sys.modules, "peft" in sys.modules, "bitsandbytes" in sys.modules)
        """
    )
    assert out == "False False False"
