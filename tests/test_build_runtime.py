"""The build's patch steps: the bindings series applies to the pinned sdist's llama_cpp package,
a patch that does not apply is refused by name, and both series are part of the wheel cache key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from allocmoe_edge import build_runtime
from allocmoe_edge.build_runtime import apply_bindings_patches, patch_hash
from allocmoe_edge.errors import AllocMoeError

BAD_PATCH = """\
--- a/llama_cpp/llama.py
+++ b/llama_cpp/llama.py
@@ -1,3 +1,3 @@
-this line is not in the pinned llama.py
+nor is this one
 context
 context
"""


@pytest.fixture
def pristine_bindings(tmp_path: Path) -> Path:
    """A scratch sdist root holding a copy of the pinned sdist's llama_cpp package."""
    sdist = build_runtime.vendor_dir().parent.parent
    shutil.copytree(sdist / "llama_cpp", tmp_path / "sdist" / "llama_cpp")
    return tmp_path / "sdist"


def test_bindings_series_applies_to_the_pinned_sdist(pristine_bindings):
    llama_py = pristine_bindings / "llama_cpp" / "llama.py"
    assert "tensor_buft_overrides" not in llama_py.read_text()
    apply_bindings_patches(pristine_bindings, log=lambda _: None)
    assert "tensor_buft_overrides: Optional[List[Tuple[str, str]]] = None" in llama_py.read_text()
    assert "class llama_model_tensor_buft_override" in (pristine_bindings / "llama_cpp" / "llama_cpp.py").read_text()


def test_a_bindings_patch_that_does_not_apply_is_refused_by_name(pristine_bindings, tmp_path, monkeypatch):
    series = tmp_path / "bindings"
    series.mkdir()
    (series / "0001-broken.patch").write_text(BAD_PATCH)
    monkeypatch.setattr(build_runtime, "BINDINGS_PATCH_DIR", series)
    before = (pristine_bindings / "llama_cpp" / "llama.py").read_bytes()
    with pytest.raises(AllocMoeError, match=r"patch 0001-broken.patch does not apply to the pinned "
                                            r"llama-cpp-python bindings \(failing file: llama_cpp/llama.py\)"):
        apply_bindings_patches(pristine_bindings, log=lambda _: None)
    assert (pristine_bindings / "llama_cpp" / "llama.py").read_bytes() == before


def test_patch_hash_covers_the_bindings_series(tmp_path, monkeypatch):
    patches = tmp_path / "patches"
    shutil.copytree(build_runtime.PATCH_DIR, patches)
    monkeypatch.setattr(build_runtime, "PATCH_DIR", patches)
    monkeypatch.setattr(build_runtime, "BINDINGS_PATCH_DIR", patches / "bindings")
    before = patch_hash()
    bindings = build_runtime.patch_files(patches / "bindings")[0]
    bindings.write_text(bindings.read_text() + "\n")
    assert patch_hash() != before
