"""The Slicer module's files: the .ui loads under Qt (PySide6, offscreen) and matches the code; CMake lists every
Python file; the icon is 128 × 128. (Slicer's own widgets — ctk*, qMRML* — load as their QWidget base here.)"""

from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT

UI = ROOT / "SACDiff" / "Resources" / "UI" / "SACDiff.ui"
MODULE = ROOT / "SACDiff" / "SACDiff.py"


def _ui_widget_names() -> set[str]:
    return {w.get("name") for w in ET.parse(UI).getroot().iter("widget")}


def _parameter_fields() -> dict[str, ast.AST]:
    tree = ast.parse(MODULE.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "SACDiffParameterNode":
            return {s.target.id: s for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("SACDiffParameterNode not found in SACDiff.py")


def test_ui_loads_offscreen_with_every_widget():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    pytest.importorskip("PySide6", reason="PySide6 not installed; pip install -e .[test]")
    from PySide6.QtCore import QFile
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QWidget

    app = QApplication.instance() or QApplication([])
    loader = QUiLoader()
    f = QFile(str(UI))
    assert f.open(QFile.ReadOnly)
    widget = loader.load(f)
    f.close()
    assert widget is not None, loader.errorString()
    loaded = {w.objectName() for w in widget.findChildren(QWidget)}
    assert _ui_widget_names() - {"SACDiff"} <= loaded
    widget.deleteLater()
    app.processEvents()


def test_every_widget_the_module_uses_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    assert used, "the module uses no widgets?"
    missing = used - _ui_widget_names()
    assert not missing, f"SACDiff.py uses widgets that SACDiff.ui lacks: {sorted(missing)}"


def test_ui_parameter_bindings_match_the_parameter_node():
    root = ET.parse(UI).getroot()
    bound = {}
    for w in root.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[p.find("string").text] = w.get("name")
    fields = _parameter_fields()
    assert set(bound) <= set(fields), f"bound to unknown parameters: {sorted(set(bound) - set(fields))}"
    assert set(fields) <= set(bound), f"parameters without a widget: {sorted(set(fields) - set(bound))}"


def test_cmake_lists_every_python_file_and_resource():
    module_cmake = (ROOT / "SACDiff" / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "SACDiff")
    for path in sorted((ROOT / "SACDiff").rglob("*.py")):
        rel = path.relative_to(ROOT / "SACDiff").as_posix()
        assert rel in module_cmake, f"SACDiff/CMakeLists.txt does not list {rel}"
    for resource in ("Resources/Icons/SACDiff.png", "Resources/UI/SACDiff.ui", "SACDiffModuleLib/requirements.txt"):
        assert resource in module_cmake and (ROOT / "SACDiff" / resource).is_file()
    top = (ROOT / "CMakeLists.txt").read_text()
    for path in sorted((ROOT / "SACDiffLib").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        assert rel in top, f"CMakeLists.txt does not list {rel}"
    assert "find_package(Slicer REQUIRED)" in top and "EXTENSION_DEPENDS PyTorch" in top
    assert "add_subdirectory(SACDiff)" in top


def test_icons_are_128_pixel_pngs():
    from PIL import Image

    for path in (ROOT / "SACDiff.png", ROOT / "SACDiff" / "Resources" / "Icons" / "SACDiff.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128)


def test_module_code_holds_no_algorithm():
    """The module may import SACDiffLib but not torch or numeric kernels of its own."""
    for path in (ROOT / "SACDiff").rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"torch", "scipy", "skimage", "pydensecrf"}, path


def test_every_node_union_in_the_parameter_node_includes_none():
    """Slicer's parameterNodeWrapper refuses a Union of node types without None (the panel would not open)."""
    for name, field in _parameter_fields().items():
        annotation = ast.unparse(field.annotation)
        if annotation.startswith(("Union[", "Optional[")) and "vtkMRML" in annotation:
            assert annotation.startswith("Optional[") or re.search(r"\bNone\b", annotation), (name, annotation)



def test_extension_index_entry_and_license():
    import json

    entry = json.loads((ROOT / "SACDiff.json").read_text())
    assert {"scm_url", "scm_revision", "build_dependencies", "category"} <= set(entry)
    assert entry["build_dependencies"] == ["PyTorch"] and entry["category"] == "Segmentation"
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"EXTENSION_DEPENDS\s+PyTorch", cmake) and entry["scm_url"].startswith(
        re.search(r'EXTENSION_HOMEPAGE "([^"]+)"', cmake).group(1))
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def test_screenshot_urls_name_pictures_in_the_repository():
    """The ExtensionsIndex refuses an empty EXTENSION_SCREENSHOTURLS; each URL must name a PNG that is committed."""
    from PIL import Image

    cmake = (ROOT / "CMakeLists.txt").read_text()
    urls = re.search(r'EXTENSION_SCREENSHOTURLS "([^"]*)"', cmake).group(1).split()
    homepage = re.search(r'EXTENSION_HOMEPAGE "https://github.com/([^"]+)"', cmake).group(1)
    assert len(urls) >= 1
    for url in urls:
        prefix = f"https://raw.githubusercontent.com/{homepage}/main/"
        assert url.startswith(prefix), url
        with Image.open(ROOT / url[len(prefix):]) as image:
            assert image.format == "PNG" and min(image.size) >= 300
