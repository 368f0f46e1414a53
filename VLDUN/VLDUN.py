"""3D Slicer module of the VLDUN extension: the GUI and the self-test around VLDUNLib.logic.

VLDUNLib needs PyTorch, which is not installed when Slicer first loads this file, so VLDUNLib and
torch are imported inside functions only.
"""

import importlib
import importlib.util
import math
import platform
import traceback
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

PAPER_TITLE = "Vision–Language Controlled Deep Unfolding for Joint Medical Image Restoration and Segmentation"
DEVICES = ["auto", "cuda", "mps", "cpu"]
CUSTOM_WEIGHTS_INDEX = 1
TORCH_REQUIREMENT = ">=2.1"
TORCH_PACKAGES = ("torch", "torchvision")
SLICER_BUNDLED_PACKAGES = {"numpy", "simpleitk", "requests"}
MAMBA_OFFERED_SETTING = "VLDUN/MambaSsmOffered"


class VLDUN(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "VLDUN"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["VLDUN developers"]
        self.parent.helpText = """
Restores a low-quality MRI or CT scan (noise, blur, motion, low resolution, undersampled or
sparse-view acquisition) and segments it in one step.<br>
Pick the input volume and press <b>Apply</b>. The <b>Detected</b> section then shows the modality
and degradation the model recognised; a warning appears when the scan is unlike the training data.
Results are for research and need expert review; they are not for diagnosis.<br>
See the <a href="https://github.com/vldun/SlicerVLDUN">extension documentation</a>.
"""
        self.parent.acknowledgementText = f"""
This extension implements VL-DUN as described in: P. Chen, Z. Huang, X. Wang, Y. Liu, B. Liang,
H. Zeng, Y. Chen, <i>{PAPER_TITLE}</i>. Please cite this paper when you use the extension in your research.
"""
        slicer.app.connect("startupCompleted()", loadTerminology)


def loadTerminology() -> None:
    """Let the Segment Editor's terminology selector know every VL-DUN class (myocardium, tumour sub-regions)."""
    from VLDUNLib.terminology import TERMINOLOGY_FILE

    slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(TERMINOLOGY_FILE))


@parameterNodeWrapper
class VLDUNParameterNode:
    """The module's choices, stored in the scene so they are saved and restored with it.

    weightsPath "" means the shipped default weights; degradationOverride "" lets the model detect
    the degradation; mirror averages the segmentation over 4 mirror images (off: it costs 4x the
    segmentation pass and blurs away small lesions).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    weightsPath: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    degradationOverride: str = ""
    mirror: bool = False


class VLDUNParameterLogic(ScriptedLoadableModuleLogic):
    """Owns the module's parameter node only.

    The computation is VLDUNLib.logic.VLDUNLogic, which must also run without Qt (command line,
    tests) and so cannot derive from ScriptedLoadableModuleLogic.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.moduleName = "VLDUN"

    def getParameterNode(self) -> VLDUNParameterNode:
        return VLDUNParameterNode(super().getParameterNode())


class VLDUNWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: choose volumes and options, run VL-DUN, show what it detected."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._vldunLogic = None
        self._vldunWeights = None
        self._running = False
        self._cancelRequested = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VLDUN.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VLDUNParameterLogic()

        self._fillDegradationComboBox()
        self.ui.progressBar.hide()
        self.ui.outOfDistributionLabel.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._onWeightsChanged)
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)", self._onWeightsChanged)
        self.ui.degradationComboBox.connect("currentIndexChanged(int)", self._onDegradationChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Attach the scene's parameter node, defaulting the input to the volume the user is looking at."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = displayedVolume()

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._showUnboundParameters()
            self._checkCanApply()

    def _fillDegradationComboBox(self) -> None:
        """Offer the override names of VLDUNLib; loading them needs torch, so until it is installed only "auto"."""
        from VLDUNLib.logic import missing_dependencies

        comboBox = self.ui.degradationComboBox
        if comboBox.count == 0:
            comboBox.addItem("auto", "")
        if comboBox.count > 1 or missing_dependencies():
            return
        from VLDUNLib.logic import DEGRADATION_CHOICES

        for name in DEGRADATION_CHOICES:
            comboBox.addItem(name.replace("_", " "), name)

    def _showUnboundParameters(self) -> None:
        """Copy weightsPath and degradationOverride into the GUI.

        connectGui cannot bind them: ctkPathLineEdit binds only pathlib paths, and the degradation
        names are known only at run time.
        """
        weightsPath = self._parameterNode.weightsPath
        override = self._parameterNode.degradationOverride
        if weightsPath:
            self.ui.weightsPathLineEdit.currentPath = weightsPath
        self.ui.modelComboBox.currentIndex = CUSTOM_WEIGHTS_INDEX if weightsPath else 0
        self.ui.degradationComboBox.currentIndex = max(self.ui.degradationComboBox.findData(override), 0)
        self._onWeightsChanged()
        self._onDegradationChanged()

    def _onWeightsChanged(self) -> None:
        custom = self.ui.modelComboBox.currentIndex == CUSTOM_WEIGHTS_INDEX
        self.ui.weightsPathLineEdit.enabled = custom
        if self._parameterNode:
            self._parameterNode.weightsPath = self.ui.weightsPathLineEdit.currentPath if custom else ""

    def _onDegradationChanged(self) -> None:
        if self._parameterNode:
            self._parameterNode.degradationOverride = self.ui.degradationComboBox.currentData or ""

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._running or not self._parameterNode:
            return
        inputVolume = self._parameterNode.inputVolume
        if inputVolume:
            self.ui.outputVolumeSelector.baseName = f"{inputVolume.GetName()} restored"
            self.ui.outputSegmentationSelector.baseName = f"{inputVolume.GetName()} segmentation"
        problem = self._applyProblem()
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or "Restore the input volume and segment it."

    def _applyProblem(self) -> str | None:
        """Why Apply cannot run now, as a tooltip for the disabled button; None when it can."""
        parameters = self._parameterNode
        if not parameters.inputVolume:
            return "Select an input volume."
        if parameters.outputVolume and parameters.outputVolume.GetID() == parameters.inputVolume.GetID():
            return "The restored volume must not be the input volume: pick another one or create a new one."
        custom = self.ui.modelComboBox.currentIndex == CUSTOM_WEIGHTS_INDEX
        if custom and not parameters.weightsPath.lower().endswith(".safetensors"):
            return 'Choose a .safetensors weights file, or set the model to "Shipped default".'
        return None

    def onApplyButton(self) -> None:
        """Apply starts a run; while one runs, the same button cancels it."""
        if self._running:
            self._requestCancel()
            return
        try:
            if dependenciesReady():
                self._fillDegradationComboBox()
                self._runOrOfferCpu()
        except Exception as error:
            slicer.util.errorDisplay(f"VLDUN failed: {error}", detailedText=traceback.format_exc())

    def _runOrOfferCpu(self) -> None:
        """A GPU out of memory even one slice at a time gets one question: run the same job on the CPU now."""
        from VLDUNLib.inference import DeviceOutOfMemory

        try:
            self._run()
        except DeviceOutOfMemory as error:
            question = f"{error}\n\nRun it on the CPU now? That is slower, but uses the computer's main memory."
            if not slicer.util.confirmOkCancelDisplay(question, "VLDUN: GPU out of memory"):
                raise
            self._parameterNode.device = "cpu"
            self._run()

    def _run(self) -> None:
        from VLDUNLib.logic import Cancelled

        parameters = self._parameterNode
        createdNodes = self._createMissingOutputs()
        inputVolume, outputVolume, segmentation = (
            parameters.inputVolume, parameters.outputVolume, parameters.outputSegmentation)
        self._clearDetection()
        self._setRunning(True)
        try:
            detection = self._computeLogic(parameters.weightsPath).process(
                inputVolume,
                outputVolume,
                segmentation,
                device=parameters.device,
                progress=self._onProgress,
                should_cancel=lambda: self._cancelRequested,
                degradation_override=parameters.degradationOverride or None,
                mirror=parameters.mirror,
            )
        except Cancelled:
            removeNodes(createdNodes)
            self._endProgress("Cancelled")
            return
        except Exception:
            removeNodes(createdNodes)
            self.ui.progressBar.hide()
            raise
        finally:
            self._setRunning(False)
        self._endProgress("Done")
        self._showDetection(detection)
        showResults(outputVolume, segmentation)

    def _createMissingOutputs(self) -> list:
        """Outputs left on "Create new ..." are made now, so a cancelled or failed run can remove them again."""
        parameters = self._parameterNode
        inputName = parameters.inputVolume.GetName()
        created = []
        if not parameters.outputVolume:
            parameters.outputVolume = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", f"{inputName} restored")
            created.append(parameters.outputVolume)
        if not parameters.outputSegmentation:
            parameters.outputSegmentation = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{inputName} segmentation")
            created.append(parameters.outputSegmentation)
        return created

    def _computeLogic(self, weightsPath: str):
        """Loading the network takes seconds, so the logic is kept while the weights stay the same."""
        from VLDUNLib.logic import VLDUNLogic

        if self._vldunLogic is None or self._vldunWeights != weightsPath:
            self._vldunLogic = VLDUNLogic(weightsPath or None)
            self._vldunWeights = weightsPath
        return self._vldunLogic

    def _setRunning(self, running: bool) -> None:
        self._running = running
        self._cancelRequested = False
        for section in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                        self.ui.advancedCollapsibleButton):
            section.enabled = not running
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        if running:
            self.ui.applyButton.enabled = True
            self.ui.applyButton.toolTip = "Stop the run; the scene is left as it was before Apply."
            self.ui.progressBar.show()
            self.ui.progressBar.setRange(0, 0)
            slicer.app.processEvents()
        else:
            self._checkCanApply()

    def _requestCancel(self) -> None:
        """The logic polls the flag between batches, so the button just records the request."""
        self._cancelRequested = True
        self.ui.applyButton.enabled = False
        self.ui.applyButton.text = "Cancelling..."

    def _onProgress(self, done: int, total: int, secondsLeft: float) -> None:
        """Progress callback of VLDUNLogic.process: processing events keeps Slicer responsive and lets Cancel in."""
        self.ui.progressBar.setRange(0, total)
        self.ui.progressBar.value = done
        self.ui.progressBar.format = progressText(done, total, secondsLeft)
        slicer.app.processEvents()

    def _endProgress(self, text: str) -> None:
        """A busy (0, 0) range hides the text, so the bar gets a real range before it shows the outcome."""
        if self.ui.progressBar.maximum == 0:
            self.ui.progressBar.setRange(0, 1)
        self.ui.progressBar.format = text

    def _clearDetection(self) -> None:
        """A failed or cancelled run must not leave the previous scan's detection on screen."""
        for label in (self.ui.modalityLabel, self.ui.detectedDegradationLabel):
            label.text = "-"
            label.toolTip = ""
        self.ui.outOfDistributionLabel.hide()

    def _showDetection(self, detection) -> None:
        self.ui.modalityLabel.text = f"{detection.modality} ({detection.modality_probability:.0%})"
        self.ui.modalityLabel.toolTip = probabilityTable(detection.modality_probabilities)
        degradation = detection.degradation.replace("_", " ")
        self.ui.detectedDegradationLabel.text = f"{degradation} ({detection.degradation_probability:.0%})"
        self.ui.detectedDegradationLabel.toolTip = probabilityTable(detection.degradation_probabilities)
        self.ui.outOfDistributionLabel.visible = detection.out_of_distribution
        self.ui.detectedCollapsibleButton.collapsed = False


def displayedVolume():
    """The background volume of the red slice view: the scan the user is most likely working on."""
    layoutManager = slicer.app.layoutManager()
    sliceWidget = layoutManager.sliceWidget("Red") if layoutManager else None
    if not sliceWidget:
        return None
    volumeID = sliceWidget.sliceLogic().GetSliceCompositeNode().GetBackgroundVolumeID()
    volume = slicer.mrmlScene.GetNodeByID(volumeID) if volumeID else None
    return volume if volume and volume.GetClassName() == "vtkMRMLScalarVolumeNode" else None


def progressText(done: int, total: int, secondsLeft: float) -> str:
    """Progress bar text; the time left is not finite until the first batch has been timed."""
    if not math.isfinite(secondsLeft):
        return f"{done} / {total} slices"
    minutes, seconds = divmod(round(secondsLeft), 60)
    return f"{done} / {total} slices, {minutes}:{seconds:02d} left"


def probabilityTable(probabilities: dict[str, float]) -> str:
    """Tooltip listing every class, most likely first, so a close second choice is visible."""
    ranked = sorted(probabilities.items(), key=lambda item: item[1], reverse=True)
    return "\n".join(f"{name.replace('_', ' ')}: {probability:.1%}" for name, probability in ranked)


def removeNodes(nodes: list) -> None:
    for node in nodes:
        slicer.mrmlScene.RemoveNode(node)


def showResults(restoredVolume, segmentation) -> None:
    """Show the segmentation in 3D and the restored volume in the slice views."""
    segmentation.CreateDefaultDisplayNodes()
    segmentation.CreateClosedSurfaceRepresentation()
    slicer.util.setSliceViewerLayers(background=restoredVolume, fit=True)


def dependenciesReady() -> bool:
    """Install what VLDUNLib needs after one confirmation; False when the user declined or it is still missing."""
    from VLDUNLib.logic import missing_dependencies

    missing = missing_dependencies()
    if missing:
        if not slicer.util.confirmOkCancelDisplay(installQuestion(missing), "VLDUN needs Python packages"):
            return False
        with slicer.util.WaitCursor():
            installPackages(missing)
        importlib.invalidate_caches()
        stillMissing = missing_dependencies()
        if stillMissing:
            slicer.util.errorDisplay(
                f"These packages are still missing after the installation: {', '.join(stillMissing)}.\n"
                "Restart Slicer and press Apply again.")
            return False
    offerMambaSsm()
    return True


def installQuestion(missing: list[str]) -> str:
    return (
        "VLDUN needs these Python packages, which are not installed yet:\n\n  "
        + "\n  ".join(missing)
        + "\n\nInstall them now? PyTorch alone can be a download of a few GB, so this may take several "
        "minutes, during which Slicer does not respond."
    )


def installPackages(missing: list[str]) -> None:
    """numpy, SimpleITK and requests ship with Slicer; reinstalling them with pip can break Slicer."""
    packages = [name for name in missing if name.lower() not in SLICER_BUNDLED_PACKAGES]
    if any(name in TORCH_PACKAGES for name in packages):
        installTorch()
    others = [name for name in packages if name not in TORCH_PACKAGES]
    if others:
        slicer.util.pip_install(" ".join(others))


def installTorch() -> None:
    """Install torch and torchvision together, so pip never pairs a torchvision with another torch build.

    The PyTorch extension is preferred: it picks the CUDA build that matches the installed GPU driver.
    """
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.pip_install(f"torch{TORCH_REQUIREMENT} torchvision")
        return
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise RuntimeError(
            "PyTorch could not be installed. Install it in the PyTorch Utils module, then press Apply again.")


def offerMambaSsm() -> None:
    """Offer the optional CUDA kernels of mamba-ssm once.

    They build only on Linux against a CUDA PyTorch; without them VLDUNLib uses its pure PyTorch
    scan, so a failed build must not stop the run.
    """
    if platform.system() != "Linux" or importlib.util.find_spec("mamba_ssm") is not None:
        return
    settings = qt.QSettings()
    if slicer.util.toBool(settings.value(MAMBA_OFFERED_SETTING, False)):
        return
    import torch

    if not torch.cuda.is_available():
        return
    settings.setValue(MAMBA_OFFERED_SETTING, True)
    if not slicer.util.confirmOkCancelDisplay(
            "Optional: install mamba-ssm for faster processing on this CUDA GPU? It compiles GPU code and can "
            "take a long time. VLDUN works without it.", "VLDUN optional package"):
        return
    try:
        with slicer.util.WaitCursor():
            slicer.util.pip_install("mamba-ssm")
    except Exception:
        slicer.util.warningDisplay(
            "mamba-ssm could not be installed; VLDUN continues without it.", detailedText=traceback.format_exc())


class VLDUNTest(ScriptedLoadableModuleTest):
    """Runs the logic on a small block of MRHead on the CPU, so it finishes in seconds."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_RestoresAndSegmentsSmallVolume()
        self.setUp()
        self.test_CancelLeavesOutputsUntouched()

    def _requireDependencies(self) -> None:
        from VLDUNLib.logic import missing_dependencies

        missing = missing_dependencies()
        if missing:
            self.skipTest(f"VLDUN needs {', '.join(missing)}: open the module and press Apply once to install them.")

    def _smallMRHead(self):
        import SampleData

        self.delayDisplay("Loading MRHead")
        return smallVolume(SampleData.downloadSample("MRHead"), slices=3, size=64)

    def test_RestoresAndSegmentsSmallVolume(self) -> None:
        self._requireDependencies()
        import numpy as np
        from VLDUNLib.logic import VLDUNLogic

        inputVolume = self._smallMRHead()
        restored = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "restored")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
        self.delayDisplay("Running VL-DUN on the CPU")
        detection = VLDUNLogic().process(inputVolume, restored, segmentation, device="cpu", batch_size=2)

        self.assertEqual(restored.GetImageData().GetDimensions(), inputVolume.GetImageData().GetDimensions())
        np.testing.assert_allclose(ijkToRas(restored), ijkToRas(inputVolume), atol=1e-6)
        self.assertTrue(np.isfinite(slicer.util.arrayFromVolume(restored)).all())
        names = [segmentation.GetSegmentation().GetNthSegment(index).GetName()
                 for index in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, list(detection.segment_names))
        self.delayDisplay("Test passed")

    def test_CancelLeavesOutputsUntouched(self) -> None:
        self._requireDependencies()
        from VLDUNLib.logic import Cancelled, VLDUNLogic

        inputVolume = self._smallMRHead()
        restored = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "restored")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
        with self.assertRaises(Cancelled):
            VLDUNLogic().process(inputVolume, restored, segmentation, device="cpu", batch_size=2,
                                 should_cancel=lambda: True)
        self.assertIsNone(restored.GetImageData())
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 0)
        self.delayDisplay("Test passed")


def ijkToRas(volume):
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def smallVolume(volume, slices: int, size: int):
    """The central block of `slices` slices of size x size voxels, where it was in `volume`.

    The block is cut across the axis VL-DUN slices along and keeps the spacing and directions, so
    the logic slices the block along the same axis as the whole volume.
    """
    import numpy as np
    from VLDUNLib.mrml import slice_axis

    voxels = slicer.util.arrayFromVolume(volume)
    counts = [size, size, size]
    counts[slice_axis(volume)] = slices
    starts = [(length - count) // 2 for length, count in zip(voxels.shape, counts)]
    block = voxels[tuple(slice(start, start + count) for start, count in zip(starts, counts))].copy()
    shift = np.eye(4)
    shift[:3, 3] = starts[::-1]
    return slicer.util.addVolumeFromArray(block, ijkToRas(volume) @ shift, name=f"{volume.GetName()} small")
