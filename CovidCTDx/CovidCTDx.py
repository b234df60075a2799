"""CovidCTDx Slicer module: chest CT → lungs, lesions, COVID-19 classification, severity, findings.

Thin by design: the Widget wires the .ui to a parameter node, the Logic delegates to
``CovidCTDxLib`` (pipeline in a background ``PythonSlicer`` process, scene writing in
``CovidCTDxLib.slicer_bridge``). Everything heavy is imported lazily, so loading the
module never needs torch, and missing packages are installed only when the user
confirms, on first use.
"""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent


def _ensureLibraryOnPath() -> None:
    """Make ``import CovidCTDxLib`` work from an installed extension and from a checkout.

    Installed, the library sits next to this file (qt-scripted-modules); in a source
    checkout it is one folder up.
    """
    for candidate in (MODULE_DIR, MODULE_DIR.parent):
        if (candidate / "CovidCTDxLib" / "__init__.py").exists():
            if str(candidate) not in sys.path:
                sys.path.insert(0, str(candidate))
            return


_ensureLibraryOnPath()


def resourceFile(*parts: str) -> Optional[Path]:
    """A shared resource (terminology, sample data, weights) installed or in the checkout."""
    for root in (MODULE_DIR / "Resources", MODULE_DIR.parent / "Resources"):
        path = root.joinpath(*parts)
        if path.exists():
            return path
    return None


SAMPLE_DATA_FILE = ("SampleData", "A0001_chest_ct.nii.gz")
TERMINOLOGY_FILE = ("Terminology", "CovidCTDx.term.json")


def stageKeys() -> Sequence[str]:
    """The pipeline's stage names, from the library's one list (imported on use, not at load)."""
    from CovidCTDxLib.result import STAGES

    return STAGES

#: Python packages the pipeline imports (import name → pip name); torch comes from PyTorch Utils.
PYTHON_REQUIREMENTS = {
    "scipy": "scipy",
    "skimage": "scikit-image",
    "SimpleITK": "SimpleITK",
    "pydicom": "pydicom",
    "nrrd": "pynrrd",
    "safetensors": "safetensors",
}
MINIMUM_TORCH_VERSION = "2.1"

SAMPLE_ATTRIBUTION = (
    "Chest CT A0001 from the TCIA collection Lung-PET-CT-Dx (Li P. et al., 'A Large-Scale CT and "
    "PET/CT Dataset for Lung Cancer Diagnosis', The Cancer Imaging Archive, 2020, "
    "doi:10.7937/TCIA.2020.NNC20461), licensed CC BY 4.0."
)


#
# CovidCTDx
#
class CovidCTDx(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CovidCTDx")
        self.parent.categories = ["Chest Imaging Platform"]
        self.parent.dependencies = []
        self.parent.contributors = ["CovidCTDx contributors"]
        self.parent.helpText = _(
            "Chest CT → right/left lungs, COVID-19 lesions (ground glass, consolidation), scan-level "
            "classification (COVID-19 / community-acquired pneumonia / non-pneumonia, DeepSC-COVID), "
            "severity (RACNet) and quantitative findings (lesion count, volume, lesion volume ratio, "
            "peripheral lesion ratio, HU distribution).<br><br>"
            "<b>Research use only. Outputs of weights trained on synthetic data are labelled "
            "'not for diagnosis'.</b><br><br>"
            "Edit the segmentation in Segment Editor, then press <i>Recompute from segmentation</i> "
            "to update the findings table.<br><br>"
            "If you use this module, please cite:<ul>"
            "<li>Wang X. et al., 'Joint Learning of 3D Lesion Segmentation and Classification for "
            "Explainable COVID-19 Diagnosis' (DeepSC-COVID), IEEE Transactions on Medical Imaging, 2021.</li>"
            "<li>Kollias D. et al., 'MIA-COV19D: COVID-19 Detection through 3-D Chest CT Image Analysis' "
            "(COV19-CT-DB and RACNet), ICCV Workshops, 2021.</li>"
            "<li>Rahimzadeh M. et al., 'A fully automated deep learning-based network for detecting "
            "COVID-19 from a new and large lung CT scan dataset' (COVID-CTset), Biomedical Signal "
            "Processing and Control, 2021.</li>"
            "<li>Liu B. et al., lesion-attention deep neural network (LA-DNN) for COVID-19 CT diagnosis.</li>"
            "</ul>"
            "Sample data: " + SAMPLE_ATTRIBUTION
        )
        self.parent.acknowledgementText = _(
            "Re-implements DeepSC-COVID and RACNet from their publications. The bundled sample chest CT "
            "is from The Cancer Imaging Archive (Lung-PET-CT-Dx, CC BY 4.0); we thank the data "
            "contributors and TCIA. Segment terminology follows SNOMED CT as used by Slicer's "
            "TotalSegmentator and MONAIAuto3DSeg extensions."
        )
        slicer.app.connect("startupCompleted()", loadTerminology)
        slicer.app.connect("startupCompleted()", registerSampleData)


def loadTerminology() -> Optional[str]:
    """Load CovidCTDx's terminology so its segments show codes in Segment Editor."""
    path = resourceFile(*TERMINOLOGY_FILE)
    terminologies = getattr(slicer.modules, "terminologies", None)
    if path is None or terminologies is None:
        logging.warning("CovidCTDx: terminology file or Terminologies module not found; segments keep their codes anyway.")
        return None
    name = terminologies.logic().LoadTerminologyFromFile(str(path))
    if not name:
        logging.error("CovidCTDx: could not load terminology %s", path)
    return name or None


def registerSampleData() -> None:
    """Register the bundled real chest CT (CC BY 4.0) in Sample Data; skip if not bundled."""
    path = resourceFile(*SAMPLE_DATA_FILE)
    if path is None:
        logging.info("CovidCTDx: no bundled sample CT; Sample Data entry not registered.")
        return
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="CovidCTDx",
        sampleName="CovidCTDxChestCT",
        uris=path.as_uri(),
        fileNames="A0001_chest_ct.nii.gz",
        nodeNames="CovidCTDxChestCT",
        thumbnailFileName=str(resourceFile("Icons", "CovidCTDx.png") or ""),
        loadFileType="VolumeFile",
        customDownloader=None,
    )


#
# Parameter node
#
@parameterNodeWrapper
class CovidCTDxParameterNode:
    """Inputs, options and outputs; saved with the scene, so a reload restores them."""

    inputVolume: vtkMRMLScalarVolumeNode
    runLungs: bool = True
    runDeepSC: bool = True
    runRACNet: bool = True
    runFindings: bool = True
    weightsDirectory: str = ""
    lungModelFile: str = ""
    outputSegmentation: vtkMRMLSegmentationNode
    outputFindingsTable: vtkMRMLTableNode
    outputClassificationTable: vtkMRMLTableNode
    outputSeverityTable: vtkMRMLTableNode
    outputEvidence: vtkMRMLScalarVolumeNode


#
# Widget
#
class CovidCTDxWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_INTERVAL_MS = 250

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[CovidCTDxLogic] = None
        self._parameterNode: Optional[CovidCTDxParameterNode] = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobInput = None
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollJob)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CovidCTDx.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CovidCTDxLogic()
        loadTerminology()  # also after a module reload, when startupCompleted() has long fired

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.recomputeButton.connect("clicked(bool)", self.onRecomputeButton)
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)", self.onWeightsPathChanged)
        self.ui.lungModelPathLineEdit.connect("currentPathChanged(QString)", self.onLungModelPathChanged)
        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopJob()
        self.removeObservers()

    def onReload(self) -> None:
        """Reload the library too, not only this file (as SlicerMONAIAuto3DSeg does for its lib).

        The module imports ``CovidCTDxLib`` lazily, inside the calls that need it, so dropping
        every loaded library module from ``sys.modules`` makes the next call import the edited
        code; Slicer's own reload then re-imports this file.
        """
        for name in [n for n in sys.modules if n == "CovidCTDxLib" or n.startswith("CovidCTDxLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode: Optional[CovidCTDxParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.ui.weightsPathLineEdit.currentPath = self._parameterNode.weightsDirectory
            self.ui.lungModelPathLineEdit.currentPath = self._parameterNode.lungModelFile
            self.updateGUIFromParameterNode()

    # ------------------------------------------------------------------ GUI state
    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self._job is not None
        stages = self.selectedStages()
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = running or bool(p.inputVolume and stages)
        self.ui.applyButton.toolTip = (
            _("Stop the run; the scene is left as it was.") if running
            else _("Run the selected stages on the input volume.") if p.inputVolume and stages
            else _("Select an input volume and at least one stage.")
        )
        self.ui.recomputeButton.enabled = not running and bool(p.outputSegmentation and p.inputVolume)
        self.updateModelCard()
        self.updateSummary()

    def selectedStages(self) -> List[str]:
        p = self._parameterNode
        chosen = {"lungs": p.runLungs, "deepsc": p.runDeepSC, "racnet": p.runRACNet, "findings": p.runFindings}
        return [s for s in stageKeys() if chosen[s]]

    def onWeightsPathChanged(self, path: str) -> None:
        if self._parameterNode is not None and self._parameterNode.weightsDirectory != path:
            self._parameterNode.weightsDirectory = path

    def onLungModelPathChanged(self, path: str) -> None:
        if self._parameterNode is not None and self._parameterNode.lungModelFile != path:
            self._parameterNode.lungModelFile = path

    def updateModelCard(self) -> None:
        cards = self.logic.modelCards(self._parameterNode.weightsDirectory or None)
        if not cards:
            self.ui.modelCardTextBrowser.setPlainText(_("No model weights found: only lungs, lesions by density and findings can run."))
            self.ui.syntheticWarningLabel.setVisible(False)
            return
        self.ui.modelCardTextBrowser.setHtml(self.logic.modelCardsHtml(cards))
        self.ui.syntheticWarningLabel.setVisible(any(card.get("synthetic") is not False for card in cards))

    def updateSummary(self) -> None:
        summary = self.logic.summary(self._parameterNode)
        self.ui.classificationLabel.text = summary["classification"]
        self.ui.severityLabel.text = summary["severity"]
        self.ui.metricsLabel.text = summary["metrics"]
        self.ui.readingLabel.text = summary["reading"]
        self.ui.resultProvenanceLabel.text = summary["provenance"]

    # ------------------------------------------------------------------ run / cancel
    def onApplyButton(self) -> None:
        if self._job is not None:
            self._stopJob()
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
            return
        p = self._parameterNode
        stages = self.selectedStages()
        with slicer.util.tryWithErrorDisplay(_("Failed to start CovidCTDx."), waitCursor=True):
            if not self.logic.ensureDependencies(stages, askConfirmation=True):
                self.ui.statusLabel.text = _("Required Python packages are not installed.")
                return
            self._job = self.logic.startBackgroundProcessing(
                p.inputVolume, stages, p.weightsDirectory or None, lungModel=p.lungModelFile or None
            )
            self._jobInput = p.inputVolume
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting…")
            self._timer.start()
        self.updateGUIFromParameterNode()

    def onPollJob(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        job.poll()
        self.ui.progressBar.value = int(round(100 * job.fraction))
        if job.message:
            self.ui.statusLabel.text = job.message
        if not job.finished:
            return
        self._timer.stop()
        try:
            if job.state == "succeeded":
                with slicer.util.tryWithErrorDisplay(_("Could not add the results to the scene."), waitCursor=True):
                    nodes = self.logic.finishBackgroundProcessing(job, self._jobInput)
                    self.setOutputs(nodes)
                    self.ui.statusLabel.text = _("Done.")
            elif job.state == "failed":
                self.ui.statusLabel.text = job.error
                slicer.util.errorDisplay(job.error, windowTitle="CovidCTDx")
        finally:
            job.cleanup()
            self._job = None
            self._jobInput = None
            self.ui.progressBar.setVisible(False)
            self.updateGUIFromParameterNode()

    def _stopJob(self) -> None:
        self._timer.stop()
        if self._job is not None:
            self._job.cancel()
            self._job.cleanup()
            self._job = None
            self._jobInput = None
        if hasattr(self, "ui"):
            self.ui.progressBar.setVisible(False)
            self.updateGUIFromParameterNode()

    def setOutputs(self, nodes) -> None:
        p = self._parameterNode
        p.outputSegmentation = nodes.segmentation
        p.outputFindingsTable = nodes.findings_table
        p.outputClassificationTable = nodes.classification_table
        p.outputSeverityTable = nodes.severity_table
        p.outputEvidence = nodes.evidence_volume
        self.logic.showResults(p.inputVolume, nodes)

    def onRecomputeButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not recompute the findings."), waitCursor=True):
            p.outputFindingsTable = self.logic.recomputeFindings(p.outputSegmentation, p.inputVolume, p.outputFindingsTable)
            self.ui.statusLabel.text = _("Findings recomputed from the segmentation.")
        self.updateGUIFromParameterNode()


#
# Logic
#
class CovidCTDxLogic(ScriptedLoadableModuleLogic):
    """Scriptable entry point; all work is delegated to ``CovidCTDxLib``.

    From the Python console::

        logic = slicer.util.getModuleLogic("CovidCTDx")   # or CovidCTDx.CovidCTDxLogic()
        nodes = logic.process(volumeNode)                 # ResultNodes
        logic.processFolder("/data/cts", "/data/out")     # headless batch, no scene
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> CovidCTDxParameterNode:
        return CovidCTDxParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ dependencies
    @staticmethod
    def missingPackages(stages: Sequence[str]) -> List[str]:
        import importlib.util

        missing = [pip for module, pip in PYTHON_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
        if ({"deepsc", "racnet"} & set(stages)) and importlib.util.find_spec("torch") is None:
            missing.append("torch")
        return missing

    def ensureDependencies(self, stages: Optional[Sequence[str]] = None, askConfirmation: bool = True) -> bool:
        """Install what the selected stages need, after the user agrees. Never runs at import."""
        missing = self.missingPackages(stages or stageKeys())
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("CovidCTDx needs these Python packages: {packages}. Install them now? This needs a network "
              "connection and may take several minutes.").format(packages=", ".join(missing)),
            windowTitle="CovidCTDx",
        ):
            return False
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ModuleNotFoundError as exc:
                raise RuntimeError(_("CovidCTDx needs the PyTorch extension: install it from the Extensions Manager.")) from exc
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}") is None:
                    raise RuntimeError(_("PyTorch could not be installed."))
            missing.remove("torch")
        if missing:
            slicer.util.pip_install(missing)
        return not self.missingPackages(stages or stageKeys())

    # ------------------------------------------------------------------ models
    @staticmethod
    def weightsDirectory(weightsDir: Optional[str]) -> Path:
        from CovidCTDxLib.pipeline import default_weights_dir

        bundled = resourceFile("weights")
        return Path(weightsDir) if weightsDir else (bundled or default_weights_dir())

    def modelCards(self, weightsDir: Optional[str]) -> List[Dict]:
        """Model cards (JSON sidecars of the .safetensors files); read without importing torch."""
        from CovidCTDxLib.weights import read_model_cards

        return read_model_cards(self.weightsDirectory(weightsDir))

    @staticmethod
    def modelCardsHtml(cards: List[Dict]) -> str:
        from CovidCTDxLib.slicer_bridge.panel_text import model_cards_html

        return model_cards_html(cards)

    # ------------------------------------------------------------------ processing
    def _options(self, stages: Optional[Sequence[str]], weightsDir: Optional[str], lungModel: Optional[str] = None):
        from CovidCTDxLib.pipeline import PipelineOptions

        return PipelineOptions(
            stages=tuple(stages or stageKeys()),
            weights_dir=self.weightsDirectory(weightsDir),
            lung_model=Path(lungModel) if lungModel else None,
        )

    def process(
        self,
        volumeNode,
        stages: Optional[Sequence[str]] = None,
        weightsDir: Optional[str] = None,
        progressCallback: Optional[Callable[[float, str], None]] = None,
        closedSurface: bool = True,
        lungModel: Optional[str] = None,
    ):
        """Run the pipeline in this process and add the results to the scene.

        Blocks until done (for scripts and tests); the GUI uses the background process
        instead. ``lungModel``: a lung U-Net .safetensors to use instead of the classical
        lung engine. Returns ``CovidCTDxLib.slicer_bridge.scene_writer.ResultNodes``.
        """
        from CovidCTDxLib.pipeline import run_pipeline
        from CovidCTDxLib.slicer_bridge import geometry, scene_writer

        ct = geometry.ct_from_volume_node(volumeNode)
        result = run_pipeline(ct, self._options(stages, weightsDir, lungModel), progress=progressCallback)
        return scene_writer.write_result_to_scene(slicer.mrmlScene, result, volumeNode, closed_surface=closedSurface)

    def startBackgroundProcessing(self, volumeNode, stages: Optional[Sequence[str]] = None, weightsDir: Optional[str] = None,
                                  lungModel: Optional[str] = None):
        """Start the pipeline in a ``PythonSlicer`` process; poll the returned WorkerJob."""
        from CovidCTDxLib.app.worker import WorkerJob
        from CovidCTDxLib.slicer_bridge import geometry

        python = shutil.which("PythonSlicer") or sys.executable
        ct = geometry.ct_from_volume_node(volumeNode)
        return WorkerJob(ct, self._options(stages, weightsDir, lungModel), python=python).start()

    def finishBackgroundProcessing(self, job, volumeNode):
        """Bring a succeeded job's outputs into the scene (all or nothing)."""
        from CovidCTDxLib.slicer_bridge import scene_writer

        return scene_writer.write_result_to_scene(slicer.mrmlScene, job.result(), volumeNode)

    def recomputeFindings(self, segmentationNode, volumeNode, tableNode=None):
        from CovidCTDxLib.slicer_bridge import scene_writer

        return scene_writer.recompute_findings(slicer.mrmlScene, segmentationNode, volumeNode, tableNode)

    def processFolder(self, folder: str, outDir: str, stages: Optional[Sequence[str]] = None, weightsDir: Optional[str] = None,
                      progressCallback: Optional[Callable[[float, str], None]] = None,
                      lungModel: Optional[str] = None) -> Dict[str, str]:
        """Headless batch: every CT in ``folder`` → ``outDir/<case>/`` (CLI output files)."""
        from CovidCTDxLib.app.worker import process_folder

        return process_folder(Path(folder), Path(outDir), self._options(stages, weightsDir, lungModel), progressCallback)

    # ------------------------------------------------------------------ display
    @staticmethod
    def showResults(volumeNode, nodes) -> None:
        """CT in the background, evidence map as a translucent overlay, segmentation on top."""
        if nodes.evidence_volume is not None:
            slicer.util.setSliceViewerLayers(background=volumeNode, foreground=nodes.evidence_volume, foregroundOpacity=0.4)
        else:
            slicer.util.setSliceViewerLayers(background=volumeNode)
        if nodes.findings_table is not None:
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(nodes.findings_table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()

    @staticmethod
    def summary(parameterNode) -> Dict[str, str]:
        """One-line texts for the result panel, read back from the output nodes."""
        from CovidCTDxLib.slicer_bridge.panel_text import summary_texts

        if parameterNode is None:
            return summary_texts(None, None, None)
        return summary_texts(parameterNode.outputClassificationTable, parameterNode.outputSeverityTable,
                             parameterNode.outputFindingsTable)


#
# Test
#
class CovidCTDxTest(ScriptedLoadableModuleTest):
    """Self-test in a running Slicer: sample CT → lungs + findings nodes, edit → recompute."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_CovidCTDx_SampleData()
        self.setUp()
        self.test_CovidCTDx_BackgroundCancel()

    def _sampleVolume(self):
        path = resourceFile(*SAMPLE_DATA_FILE)
        if path is None:
            self.skipTest("The sample chest CT is not bundled with this build.")
        registerSampleData()
        import SampleData

        return SampleData.downloadSample("CovidCTDxChestCT")

    def test_CovidCTDx_SampleData(self) -> None:
        self.delayDisplay("Loading the bundled chest CT")
        volume = self._sampleVolume()
        logic = CovidCTDxLogic()
        stages = ("lungs", "findings")
        self.assertTrue(logic.ensureDependencies(stages, askConfirmation=False))
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        self.delayDisplay("Running lungs + findings")
        nodes = logic.process(volume, stages=stages)
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        segmentation = nodes.segmentation.GetSegmentation()
        for segmentId in ("right_lung", "left_lung", "lesion"):
            self.assertIsNotNone(segmentation.GetSegment(segmentId), segmentId)
        self.assertIsNone(nodes.classification_table)  # stage not selected: nothing invented
        self.assertEqual(nodes.findings_table.GetColumnName(0), "name")
        self.delayDisplay("Recompute after an edit")
        table = logic.recomputeFindings(nodes.segmentation, volume, nodes.findings_table)
        self.assertIs(table, nodes.findings_table)
        self.delayDisplay("Test passed")

    def test_CovidCTDx_BackgroundCancel(self) -> None:
        volume = self._sampleVolume()
        logic = CovidCTDxLogic()
        nodeIds = [slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())]
        job = logic.startBackgroundProcessing(volume, stages=("lungs",))
        job.cancel()
        self.assertEqual(job.wait(timeout=60), "cancelled")
        job.cleanup()
        self.assertEqual(nodeIds, [slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())])
        self.delayDisplay("Cancel leaves the scene unchanged")
