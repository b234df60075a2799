"""Static checks of the Slicer module, extension CMake and terminology file.

Why static: the module needs the Slicer application (Qt, PythonQt, qMRML widgets), which
is not available in CI. What can be checked without it is checked here: the module
parses, imports nothing heavy at load time, every widget the code touches exists in the
.ui, every parameter the .ui binds exists in the parameter node, CMake installs every file,
and the terminology file carries the codes from TERMINOLOGY.md.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Set

import pytest

from CovidCTDxLib.segments import COVIDCTDX_CONTEXT, SEGMENTS

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CovidCTDx"
MODULE_FILE = MODULE_DIR / "CovidCTDx.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CovidCTDx.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "CovidCTDx.png"
TERMINOLOGY_FILE = REPO / "Resources" / "Terminology" / "CovidCTDx.term.json"


@pytest.fixture(scope="module")
def module_ast() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


@pytest.fixture(scope="module")
def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _ui_widgets(root: ET.Element) -> Dict[str, str]:
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def test_module_defines_module_widget_logic_test(module_ast):
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in module_ast.body if isinstance(n, ast.ClassDef)}
    assert classes["CovidCTDx"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes["CovidCTDxWidget"]
    assert classes["CovidCTDxLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["CovidCTDxTest"] == ["ScriptedLoadableModuleTest"]
    logic = _class(module_ast, "CovidCTDxLogic")
    methods = {n.name: n for n in logic.body if isinstance(n, ast.FunctionDef)}
    process_args = [a.arg for a in methods["process"].args.args]
    assert process_args[:5] == ["self", "volumeNode", "stages", "weightsDir", "progressCallback"]
    assert [a.arg for a in methods["processFolder"].args.args][:3] == ["self", "folder", "outDir"]


def test_module_metadata_cites_papers_and_data_licence():
    text = MODULE_FILE.read_text()
    assert '"Chest Imaging Platform"' in text
    for needle in ("DeepSC-COVID", "RACNet", "COVID-CTset", "doi:10.7937/TCIA.2020.NNC20461", "CC BY 4.0", "NOT FOR DIAGNOSIS".lower()):
        assert needle.lower() in text.lower(), needle


def test_module_imports_nothing_heavy_at_load(module_ast):
    """Loading the module must work before torch/scipy are installed (install on first use)."""
    top_level = set()
    for node in module_ast.body:
        if isinstance(node, ast.Import):
            top_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add((node.module or "").split(".")[0])
    assert top_level <= {"__future__", "json", "logging", "os", "shutil", "sys", "pathlib", "typing", "qt", "slicer", "vtk"}, top_level
    source = MODULE_FILE.read_text()
    assert "pip_install" in source and "confirmOkCancelDisplay" in source and "PyTorchUtils" in source


def test_ui_parses_and_has_every_widget_the_code_uses(module_ast, ui_root):
    assert ui_root.tag == "ui"
    widgets = _ui_widgets(ui_root)
    used = {
        n.attr
        for n in ast.walk(module_ast)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Attribute)
        and n.value.attr == "ui"
        and isinstance(n.value.value, ast.Name)
        and n.value.value.id == "self"
    }
    assert used, "the widget code should use self.ui.<name>"
    missing = sorted(used - set(widgets))
    assert not missing, f"used in CovidCTDx.py but absent from the .ui: {missing}"


def test_ui_has_the_controls_the_issue_asks_for(ui_root):
    widgets = _ui_widgets(ui_root)
    expected = {
        "inputVolumeSelector": "qMRMLNodeComboBox",
        "lungsCheckBox": "QCheckBox",
        "deepscCheckBox": "QCheckBox",
        "racnetCheckBox": "QCheckBox",
        "findingsCheckBox": "QCheckBox",
        "weightsPathLineEdit": "ctkPathLineEdit",
        "lungModelPathLineEdit": "ctkPathLineEdit",
        "modelCardTextBrowser": "QTextBrowser",
        "syntheticWarningLabel": "QLabel",
        "applyButton": "QPushButton",
        "progressBar": "QProgressBar",
        "statusLabel": "QLabel",
        "classificationLabel": "QLabel",
        "severityLabel": "QLabel",
        "metricsLabel": "QLabel",
        "outputSegmentationSelector": "qMRMLNodeComboBox",
        "outputFindingsTableSelector": "qMRMLNodeComboBox",
        "recomputeButton": "QPushButton",
    }
    for name, cls in expected.items():
        assert widgets.get(name) == cls, name
    # Every custom widget class used is declared, so Designer and loadUI can build it.
    declared = {c.findtext("class") for c in ui_root.iter("customwidget")}
    qt_builtin = {cls for cls in widgets.values() if cls.startswith("Q")}
    assert set(widgets.values()) - qt_builtin <= declared
    # Every node selector gets the scene.
    receivers = {c.findtext("receiver") for c in ui_root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert {n for n, c in widgets.items() if c == "qMRMLNodeComboBox"} <= receivers


def _parameter_fields(module_ast) -> Set[str]:
    node = _class(module_ast, "CovidCTDxParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
    return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}


def test_ui_parameter_bindings_exist_in_parameter_node(module_ast, ui_root):
    fields = _parameter_fields(module_ast)
    bound = [p.findtext("string") for p in ui_root.iter("property") if p.get("name") == "SlicerParameterName"]
    assert bound and set(bound) <= fields, set(bound) - fields
    for needed in (
        "inputVolume",
        "runLungs",
        "runDeepSC",
        "runRACNet",
        "runFindings",
        "weightsDirectory",
        "lungModelFile",
        "outputSegmentation",
        "outputFindingsTable",
    ):
        assert needed in fields


def _cmake_list(text: str, variable: str, substitutions: Dict[str, str]) -> List[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, variable
    items = match.group(1).split()
    for key, value in substitutions.items():
        items = [i.replace("${" + key + "}", value) for i in items]
    return items


def test_module_cmake_lists_every_file():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert re.search(r"set\(MODULE_NAME CovidCTDx\)", text)
    listed = _cmake_list(text, "MODULE_PYTHON_SCRIPTS", {"MODULE_NAME": "CovidCTDx"})
    listed += _cmake_list(text, "MODULE_PYTHON_RESOURCES", {"MODULE_NAME": "CovidCTDx"})
    assert "slicerMacroBuildScriptedModule" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    on_disk = {
        p.relative_to(MODULE_DIR).as_posix()
        for p in MODULE_DIR.rglob("*")
        if p.is_file() and p.name != "CMakeLists.txt" and "__pycache__" not in p.parts and "Testing" not in p.parts
    }
    assert set(listed) == on_disk
    for item in listed:
        assert (MODULE_DIR / item).exists(), item


def test_extension_cmake_is_a_valid_slicer_extension():
    text = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(CovidCTDx\)", text, re.M)
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    order = [
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(CovidCTDx)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    # The library and the shared resources the module looks up at run time are installed,
    # listed file by file (no glob): exactly the files the list tool finds in the tree.
    spec = importlib.util.spec_from_file_location("update_cmake_lists", REPO / "tools" / "update_cmake_lists.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for variable, files in tool.LISTS.items():
        in_tree = {p.relative_to(REPO).as_posix() for p in files()}
        assert in_tree and set(_cmake_list(text, variable, {})) == in_tree, "run python tools/update_cmake_lists.py"
    assert any(p.endswith("CovidCTDxLib/pipeline.py") for p in _cmake_list(text, "COVIDCTDX_LIB_SCRIPTS", {}))
    assert "Resources/Terminology/CovidCTDx.term.json" in _cmake_list(text, "COVIDCTDX_LIB_RESOURCES", {})
    assert "GLOB" not in text
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").exists()


def test_icon_is_a_png():
    header = ICON_FILE.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width == height >= 64


def _walk_terminology(data) -> Dict[tuple, dict]:
    """(category code, type code, modifier code or '') → entry."""
    entries = {}
    for category in data["SegmentationCodes"]["Category"]:
        for typ in category.get("Type", []):
            entries[(category["CodeValue"], typ["CodeValue"], "")] = typ
            for modifier in typ.get("Modifier", []):
                entries[(category["CodeValue"], typ["CodeValue"], modifier["CodeValue"])] = modifier
    return entries


def test_terminology_file_has_the_codes_of_terminology_md():
    data = json.loads(TERMINOLOGY_FILE.read_text())
    assert data["SegmentationCategoryTypeContextName"] == COVIDCTDX_CONTEXT
    assert "segment-context-schema.json" in data["@schema"]
    entries = _walk_terminology(data)
    for key in [
        ("123037004", "39607008", "24028007"),  # right lung
        ("123037004", "39607008", "7771000"),  # left lung
        ("123037004", "110726009", ""),  # trachea and bronchus
        ("49755003", "47351003", "840539006"),  # COVID-19 infiltrate
        ("49755003", "1217294009", ""),  # ground glass opacity
        ("49755003", "47351003", ""),  # infiltrate (consolidation, see segments.py)
    ]:
        assert key in entries, key
        for field in ("CodingSchemeDesignator", "CodeMeaning"):
            assert entries[key][field]
    # Our own segments' colours are the file's recommended colours, so picking the entry in
    # Segment Editor gives the same colour the module writes.
    # deepsc_lesion shares the lesion's codes (same finding, another algorithm) but not its
    # colour, so that both can be told apart on screen: the file's colour is the first one's.
    seen = set()
    for spec in SEGMENTS.values():
        key = (spec.category.value, spec.type.value, spec.modifier.value)
        if spec.context != COVIDCTDX_CONTEXT or key in seen:
            continue
        seen.add(key)
        entry = entries[key]
        assert tuple(entry["recommendedDisplayRGBValue"]) == spec.color, spec.segment_id
        assert entry["CodeMeaning"] == (spec.modifier.meaning or spec.type.meaning)


def test_reload_also_reloads_the_library(module_ast):
    """onReload drops every CovidCTDxLib module so the next lazy import takes the edited code."""
    widget = next(n for n in module_ast.body if isinstance(n, ast.ClassDef) and n.name == "CovidCTDxWidget")
    reload = next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "onReload")
    source = ast.unparse(reload)
    assert "sys.modules" in source and "CovidCTDxLib." in source and "ScriptedLoadableModuleWidget.onReload(self)" in source
    # ...and nothing at module level imports the library, or a reload would keep the old objects.
    top = [n for n in module_ast.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("CovidCTDxLib" in ast.unparse(n) for n in top)
