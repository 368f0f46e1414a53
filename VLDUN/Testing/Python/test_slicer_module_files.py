"""Checks of the Slicer-side files that need neither Slicer nor torch.

They catch what otherwise shows up only inside Slicer or on the extension build machines: a widget
name that the module uses but the .ui file lacks, a library file missing from the packaged
extension, a catalog entry the Extensions Index rejects, or an import that breaks the first load
of the module before its dependencies are installed. Standard library only, so the same file runs
under pytest and as a Slicer ctest (unittest classes).
"""

import ast
import importlib.util
import json
import py_compile
import re
import struct
import sysconfig
import tempfile
import unittest
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[3]
MODULE_DIR = REPO / "VLDUN"
MODULE_PY = MODULE_DIR / "VLDUN.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "VLDUN.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = REPO / "CMakeLists.txt"
CATALOG_ENTRY = REPO / "VLDUN.json"

EXPECTED_WIDGET_CLASSES = {
    "inputSelector": "qMRMLNodeComboBox",
    "outputVolumeSelector": "qMRMLNodeComboBox",
    "outputSegmentationSelector": "qMRMLNodeComboBox",
    "modelComboBox": "QComboBox",
    "weightsPathLineEdit": "ctkPathLineEdit",
    "deviceComboBox": "QComboBox",
    "degradationComboBox": "QComboBox",
    "mirrorCheckBox": "QCheckBox",
    "applyButton": "QPushButton",
    "progressBar": "QProgressBar",
    "detectedCollapsibleButton": "ctkCollapsibleButton",
    "modalityLabel": "QLabel",
    "detectedDegradationLabel": "QLabel",
    "outOfDistributionLabel": "QLabel",
    "taskComboBox": "QComboBox",
    "segmentationNoteLabel": "QLabel",
}

# Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json ("additionalProperties": false).
CATALOG_SCHEMA_URL = (
    "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json"
)
CATALOG_REQUIRED_KEYS = {"$schema", "category", "scm_url"}
CATALOG_ALLOWED_KEYS = CATALOG_REQUIRED_KEYS | {
    "scm_revision", "scm_type", "build_dependencies", "dicom_support_rule", "build_subdirectory", "enabled", "tier",
}

EXTENSION_METADATA = (
    "EXTENSION_HOMEPAGE",
    "EXTENSION_CATEGORY",
    "EXTENSION_CONTRIBUTORS",
    "EXTENSION_DESCRIPTION",
    "EXTENSION_ICONURL",
    "EXTENSION_SCREENSHOTURLS",
    "EXTENSION_DEPENDS",
)

SLICER_PROVIDED_MODULES = {"qt", "ctk", "vtk", "slicer"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def uiWidgetClasses() -> dict[str, str]:
    return {widget.get("name"): widget.get("class") for widget in ElementTree.parse(UI_FILE).iter("widget")}


def uiWidget(name: str) -> ElementTree.Element:
    return next(w for w in ElementTree.parse(UI_FILE).iter("widget") if w.get("name") == name)


def uiProperty(widget: ElementTree.Element, name: str) -> Optional[ElementTree.Element]:  # noqa: UP045 (Python 3.9)
    """Only the widget's own properties: nested layouts carry properties of other widgets."""
    return next((p for p in widget.findall("property") if p.get("name") == name), None)


def parameterBindings() -> dict[str, str]:
    """Widget name -> SlicerParameterName, the dynamic property connectGui binds by."""
    bindings = {}
    for widget in ElementTree.parse(UI_FILE).iter("widget"):
        prop = uiProperty(widget, "SlicerParameterName")
        if prop is not None:
            bindings[widget.get("name")] = prop.findtext("string")
    return bindings


def moduleTree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"))


def parameterNodeFields() -> dict[str, str]:
    """Field name -> annotation source of the @parameterNodeWrapper class in VLDUN.py."""
    for node in moduleTree().body:
        decorators = [ast.unparse(d) for d in getattr(node, "decorator_list", [])]
        if isinstance(node, ast.ClassDef) and "parameterNodeWrapper" in decorators:
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("VLDUN.py has no @parameterNodeWrapper class")


def parameterNodeDefaults() -> dict[str, object]:
    """Field name -> default value of the @parameterNodeWrapper class, module constants resolved."""
    tree = moduleTree()
    constants = {target.id: node.value.value for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                 for target in node.targets if isinstance(target, ast.Name)}
    wrapper = next(node for node in tree.body if isinstance(node, ast.ClassDef)
                   and "parameterNodeWrapper" in [ast.unparse(d) for d in node.decorator_list])
    defaults = {}
    for field in wrapper.body:
        if isinstance(field, ast.AnnAssign) and field.value is not None:
            value = field.value
            defaults[field.target.id] = constants[value.id] if isinstance(value, ast.Name) else ast.literal_eval(value)
    return defaults


def widgetMethod(name: str) -> str:
    """Source of a method of VLDUNWidget."""
    source = MODULE_PY.read_text(encoding="utf-8")
    widget = next(n for n in moduleTree().body if isinstance(n, ast.ClassDef) and n.name == "VLDUNWidget")
    method = next((n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if method is None:
        raise AssertionError(f"VLDUNWidget has no method {name}")
    return ast.get_source_segment(source, method)


def uiAncestors(name: str) -> list[str]:
    """Names of the widgets that contain widget `name`, outermost first."""
    root = ElementTree.parse(UI_FILE).getroot()
    parents = {child: parent for parent in root.iter() for child in parent}
    element = next(w for w in root.iter("widget") if w.get("name") == name)
    names = []
    while element in parents:
        element = parents[element]
        if element.tag == "widget":
            names.insert(0, element.get("name"))
    return names


def cmakeList(name: str) -> list[str]:
    """Entries of `set(name ...)` in VLDUN/CMakeLists.txt, with ${MODULE_NAME} expanded."""
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    match = re.search(rf"set\(\s*{name}\s+(.*?)\)", text, re.DOTALL)
    if match is None:
        raise AssertionError(f"VLDUN/CMakeLists.txt does not set {name}")
    return [entry.replace("${MODULE_NAME}", "VLDUN") for entry in match.group(1).split()]


def cmakeVariables(path: Path) -> dict[str, str]:
    """Quoted `set(VAR "value")` assignments of a CMake file."""
    return dict(re.findall(r'set\(\s*(\w+)\s+"([^"]*)"\s*\)', path.read_text(encoding="utf-8")))


def isStandardLibrary(name: str) -> bool:
    """Built in, or found in the interpreter's standard library folder (sys.stdlib_module_names needs 3.10)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return spec is not None and spec.submodule_search_locations is None
    if spec.origin in ("built-in", "frozen"):
        return True
    origin = Path(spec.origin).resolve()
    standard = Path(sysconfig.get_paths()["stdlib"]).resolve()
    return standard in origin.parents and "site-packages" not in origin.parts


def pngSize(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise AssertionError(f"{path} is not a PNG file")
    return struct.unpack(">II", data[16:24])


class UiFileTest(unittest.TestCase):
    def test_every_widget_the_module_uses_exists_in_the_ui_file(self):
        used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text(encoding="utf-8")))
        missing = used - set(uiWidgetClasses())
        self.assertEqual(missing, set(), f"VLDUN.py uses widgets that VLDUN.ui lacks: {sorted(missing)}")

    def test_key_widgets_have_the_expected_class(self):
        classes = uiWidgetClasses()
        for name, expected in EXPECTED_WIDGET_CLASSES.items():
            self.assertEqual(classes.get(name), expected, name)

    def test_bound_widgets_name_fields_of_the_parameter_node(self):
        fields = parameterNodeFields()
        for widget, parameter in parameterBindings().items():
            self.assertIn(parameter, fields, f"{widget} binds to unknown parameter {parameter!r}")

    def test_node_selectors_offer_the_node_type_of_their_parameter(self):
        fields = parameterNodeFields()
        classes = uiWidgetClasses()
        for widget, parameter in parameterBindings().items():
            if classes[widget] == "qMRMLNodeComboBox":
                nodeTypes = [s.text for s in uiProperty(uiWidget(widget), "nodeTypes").iter("string")]
                self.assertEqual(nodeTypes, [fields[parameter]], widget)

    def test_node_selectors_receive_the_scene(self):
        root = ElementTree.parse(UI_FILE).getroot()
        topName = root.find("widget").get("name")
        receivers = {
            c.findtext("receiver")
            for c in root.iter("connection")
            if c.findtext("sender") == topName
            and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
            and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
        }
        selectors = {name for name, cls in uiWidgetClasses().items() if cls == "qMRMLNodeComboBox"}
        self.assertEqual(selectors - receivers, set())

    def test_non_qt_widget_classes_are_declared_as_custom_widgets(self):
        root = ElementTree.parse(UI_FILE).getroot()
        declared = {c.findtext("class") for c in root.iter("customwidget")}
        used = {cls for cls in uiWidgetClasses().values() if not cls.startswith("Q")}
        self.assertEqual(used - declared, set())


class TaskSelectorTest(unittest.TestCase):
    """The segmentation task is the user's choice: a combo box beside the input, stored in the parameter node,
    filled with the chosen model's tasks, passed to the job; the run's note is shown after it."""

    def test_the_combo_box_sits_with_the_inputs_unbound_by_connect_gui(self):
        self.assertIn("inputsCollapsibleButton", uiAncestors("taskComboBox"))
        self.assertNotIn("taskComboBox", parameterBindings(), "its items carry task ids: the module binds it itself")
        self.assertEqual(uiWidget("taskLabel").find("property/string").text, "Segmentation task:")

    def test_the_task_is_a_string_parameter_that_defaults_to_auto(self):
        self.assertEqual(parameterNodeFields().get("segmentationTask"), "str")
        self.assertEqual(parameterNodeDefaults().get("segmentationTask"), "auto")

    def test_the_combo_box_offers_auto_then_the_models_tasks_and_stores_the_choice(self):
        fill = widgetMethod("_fillTaskComboBox")
        self.assertRegex(fill, r"modelTasks\(weightsPath\)")
        self.assertRegex(fill, r"addItem\(AUTO_TASK_TEXT, AUTO_TASK\)")
        self.assertRegex(fill, r"for task, label in tasks\.items\(\):\s+comboBox\.addItem\(label, task\)")
        self.assertIn('AUTO_TASK_TEXT = "Auto (from detection)"', MODULE_PY.read_text(encoding="utf-8"))
        self.assertRegex(MODULE_PY.read_text(encoding="utf-8"), r"VLDUNLogic\(weightsPath or None\)\.tasks\(\)")
        self.assertIn('self.ui.taskComboBox.connect("currentIndexChanged(int)", self._onTaskChanged)',
                      widgetMethod("setup"))
        self.assertRegex(widgetMethod("_onTaskChanged"),
                         r"self\._parameterNode\.segmentationTask = self\.ui\.taskComboBox\.currentData")

    def test_a_model_change_refills_the_tasks(self):
        self.assertIn("self._fillTaskComboBox(weightsPath)", widgetMethod("_onWeightsChanged"))
        setup = widgetMethod("setup")
        self.assertIn('modelComboBox.connect("currentIndexChanged(int)", self._onWeightsChanged)', setup)
        self.assertIn('weightsPathLineEdit.connect("currentPathChanged(QString)", self._onWeightsChanged)', setup)

    def test_the_job_gets_the_task_and_the_note_is_shown_after_the_run(self):
        self.assertRegex(widgetMethod("_start"), r"\.job\((.|\n)*task=parameters\.segmentationTask")
        self.assertIn("self._showDetection(job.detection, job.status.note)", widgetMethod("_onPoll"))
        show = widgetMethod("_showDetection")
        self.assertIn("self.ui.segmentationNoteLabel.text = note", show)
        self.assertIn("self.ui.segmentationNoteLabel.visible = bool(note)", show)
        self.assertIn("self.ui.segmentationNoteLabel.hide()", widgetMethod("_clearDetection"))


class PackagingTest(unittest.TestCase):
    def test_every_library_file_is_packaged(self):
        listed = set(cmakeList("MODULE_PYTHON_SCRIPTS"))
        existing = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "VLDUNLib").glob("*.py")}
        self.assertEqual(existing - listed, set(), "add these to MODULE_PYTHON_SCRIPTS")
        self.assertIn("VLDUN.py", listed)

    def test_every_resource_is_packaged(self):
        listed = set(cmakeList("MODULE_PYTHON_RESOURCES"))
        existing = {
            p.relative_to(MODULE_DIR).as_posix()
            for p in (MODULE_DIR / "Resources").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
        self.assertEqual(existing - listed, set(), "add these to MODULE_PYTHON_RESOURCES")

    def test_every_packaged_file_exists(self):
        listed = cmakeList("MODULE_PYTHON_SCRIPTS") + cmakeList("MODULE_PYTHON_RESOURCES")
        self.assertEqual(len(listed), len(set(listed)), "a file is listed twice")
        missing = [entry for entry in listed if not (MODULE_DIR / entry).is_file()]
        self.assertEqual(missing, [], "the extension build fails on files listed but absent")

    def test_module_self_test_and_file_checks_are_registered_with_ctest(self):
        module = MODULE_CMAKE.read_text(encoding="utf-8")
        testingBlock = re.search(r"if\(BUILD_TESTING\)(.*?)endif\(\)", module, re.DOTALL).group(1)
        self.assertIn("slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)", testingBlock)
        self.assertIn("add_subdirectory(Testing)", testingBlock)
        testing = (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")
        self.assertIn(f"slicer_add_python_unittest(SCRIPT {Path(__file__).name})", testing)


class ExtensionMetadataTest(unittest.TestCase):
    def test_top_level_cmake_describes_and_builds_the_extension(self):
        text = TOP_CMAKE.read_text(encoding="utf-8")
        variables = cmakeVariables(TOP_CMAKE)
        for name in EXTENSION_METADATA:
            self.assertTrue(variables.get(name, "").strip(), f"{name} is not set")
        self.assertIn("project(VLDUN)", text)
        self.assertIn("add_subdirectory(VLDUN)", text)
        self.assertIn("include(${Slicer_EXTENSION_CPACK})", text)

    def test_icon_url_points_at_the_repository_icon(self):
        variables = cmakeVariables(TOP_CMAKE)
        repository = variables["EXTENSION_HOMEPAGE"].removeprefix("https://github.com/")
        self.assertEqual(
            variables["EXTENSION_ICONURL"], f"https://raw.githubusercontent.com/{repository}/main/VLDUN.png")

    def test_screenshots_are_figures_in_the_repository(self):
        variables = cmakeVariables(TOP_CMAKE)
        prefix = variables["EXTENSION_HOMEPAGE"].replace("https://github.com/", "https://raw.githubusercontent.com/")
        for url in variables["EXTENSION_SCREENSHOTURLS"].split():
            self.assertTrue(url.startswith(prefix + "/main/docs/figures/"), url)
            path = REPO / url[len(prefix + "/main/"):]
            self.assertTrue(path.is_file(), f"{path} is missing")
            pngSize(path)

    def test_description_names_slicer_versions_and_weights_terms(self):
        description = cmakeVariables(TOP_CMAKE)["EXTENSION_DESCRIPTION"]
        self.assertIn("Slicer 5.8 or later", description)
        self.assertIn("non-commercial research use", description)
        module = MODULE_PY.read_text(encoding="utf-8")
        self.assertIn('SUPPORTED_SLICER = "3D Slicer 5.8 or later"', module)
        self.assertIn("non-commercial research use", module)

    def test_catalog_entry_follows_schema_v1_0_2(self):
        entry = json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))
        self.assertEqual(entry["$schema"], CATALOG_SCHEMA_URL)
        self.assertLessEqual(CATALOG_REQUIRED_KEYS, set(entry))
        self.assertLessEqual(set(entry), CATALOG_ALLOWED_KEYS)
        self.assertIsInstance(entry["tier"], int)
        self.assertTrue(1 <= entry["tier"] <= 5)
        self.assertTrue(all(isinstance(d, str) for d in entry["build_dependencies"]))

    def test_catalog_entry_agrees_with_the_cmake_metadata(self):
        entry = json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))
        variables = cmakeVariables(TOP_CMAKE)
        self.assertEqual(entry["scm_url"], variables["EXTENSION_HOMEPAGE"])
        self.assertEqual(entry["category"], variables["EXTENSION_CATEGORY"])
        self.assertEqual(entry["build_dependencies"], variables["EXTENSION_DEPENDS"].split(";"))

    def test_icons_are_the_same_128_pixel_png(self):
        extensionIcon = REPO / "VLDUN.png"
        moduleIcon = MODULE_DIR / "Resources" / "Icons" / "VLDUN.png"
        self.assertEqual(pngSize(extensionIcon), (128, 128))
        self.assertEqual(extensionIcon.read_bytes(), moduleIcon.read_bytes())

    def test_license_is_apache_2(self):
        text = (REPO / "LICENSE.txt").read_text(encoding="utf-8")
        self.assertIn("Apache License", text)
        self.assertIn("Version 2.0, January 2004", text)
        self.assertIn("END OF TERMS AND CONDITIONS", text)


class ModuleSourceTest(unittest.TestCase):
    def test_module_compiles(self):
        with tempfile.TemporaryDirectory() as directory:
            py_compile.compile(str(MODULE_PY), cfile=str(Path(directory) / "VLDUN.pyc"), doraise=True)

    def test_top_level_imports_are_standard_library_or_slicer(self):
        """torch and VLDUNLib are absent on the first load, before the module installs its dependencies."""
        imported = set()
        for node in moduleTree().body:
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        others = {name for name in imported - SLICER_PROVIDED_MODULES if not isStandardLibrary(name)}
        self.assertEqual(others, set())

    def test_standard_library_check_tells_torch_from_json(self):
        self.assertTrue(isStandardLibrary("json") and isStandardLibrary("sys") and isStandardLibrary("xml"))
        self.assertFalse(isStandardLibrary("numpy") or isStandardLibrary("VLDUNLib") or isStandardLibrary("nonexistent"))

    def test_slicer_finds_the_module_widget_and_test_classes(self):
        classes = {node.name for node in moduleTree().body if isinstance(node, ast.ClassDef)}
        self.assertLessEqual({"VLDUN", "VLDUNWidget", "VLDUNTest"}, classes)
