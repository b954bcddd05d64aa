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


def test_checkout_kernels_folder_does_not_shadow_the_pypi_kernels_package(tmp_path):
    repo_root = __import__("pathlib").Path(__file__).resolve().parents[1]
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("def get_kernel():\n    return 'the PyPI package'\n")
    code = f"""
        import sys
        sys.path[:0] = [{str(repo_root)!r}, {str(tmp_path)!r}]   # the checkout first, as with `python -m` there
        import kernels
        print(kernels.get_kernel())
        """
    assert _run(code) == "the PyPI package"
    missing = f"""
        import sys
        sys.path.insert(0, {str(repo_root)!r})
        try:
            import kernels
        except ModuleNotFoundError as error:
            print(error.name)
        import fused_lora.kernels.lora
        print(fused_lora.kernels.lora.__name__)
        """
    assert _run(missing).split() == ["kernels", "fused_lora.kernels.lora"]
