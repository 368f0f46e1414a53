"""3D Slicer module of the VLDUN extension: the GUI and the self-test around VLDUNLib.logic.

VLDUNLib needs PyTorch, which is not installed when Slicer first loads this file, so VLDUNLib and
torch are imported inside functions only. The model runs in a worker process (VLDUNLib.job); this
file polls it from a QTimer, so Slicer stays responsive. Supported: Slicer 5.8 (Python 3.9) and later.
"""

import importlib
import logging
import math
import traceback
from typing import Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

PAPER_TITLE = "Vision–Language Controlled Deep Unfolding for Joint Medical Image Restoration and Segmentation"
MODULE_TITLE = "VL-DUN Restore & Segment"
MINIMUM_SLICER = (5, 8)
SUPPORTED_SLICER = "3D Slicer 5.8 or later"
CUSTOM_WEIGHTS_INDEX = 1
AUTO_TASK = "auto"
AUTO_TASK_TEXT = "Auto (from detection)"
POLL_INTERVAL_MS = 100
TORCH_REQUIREMENT = ">=2.1"
TORCH_PACKAGES = ("torch", "torchvision")
SLICER_BUNDLED_PACKAGES = {"numpy", "simpleitk", "requests"}
WEIGHTS_TERMS = (
    "The shipped network weights were trained on BraTS (CC BY-NC-SA) and ACDC (research use only) data and "
    "follow their terms: non-commercial research use only. The code is Apache-2.0."
)


class VLDUN(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = MODULE_TITLE
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["VLDUN developers"]
        self.parent.helpText = versionWarning() + f"""
Restores a low-quality MRI or CT scan (noise, blur, motion, low resolution, undersampled or
sparse-view acquisition) and segments it in one step, with the VL-DUN network.<br>
Pick the input volume and press <b>Apply</b>; the network runs in a separate process, so Slicer stays
usable and <b>Cancel</b> stops it at once. The <b>Segmentation task</b> picks the structures to segment;
on Auto the detected modality picks them, and a scan unlike the training data is only restored (its
segmentation is left as it was). The <b>Detected</b> section then shows the modality
and degradation the model recognised; a warning appears when the scan is unlike the training data.
Results are for research and need expert review; they are not for diagnosis.<br>
Requires {SUPPORTED_SLICER}. {WEIGHTS_TERMS}<br>
See the <a href="https://github.com/vldun/SlicerVLDUN">extension documentation</a>.
"""
        self.parent.acknowledgementText = f"""
This extension implements VL-DUN as described in: P. Chen, Z. Huang, X. Wang, Y. Liu, B. Liang,
H. Zeng, Y. Chen, <i>{PAPER_TITLE}</i>. Please cite this paper when you use the extension in your research.
{WEIGHTS_TERMS}
"""
        if versionWarning():
            logging.getLogger(__name__).warning(f"{MODULE_TITLE} needs {SUPPORTED_SLICER}; this is Slicer {slicer.app.applicationVersion}.")
        slicer.app.connect("startupCompleted()", loadTerminology)


def slicerTooOld() -> bool:
    return (slicer.app.majorVersion, slicer.app.minorVersion) < MINIMUM_SLICER


def versionWarning() -> str:
    """Help-text banner for a Slicer older than the supported ones; empty where it is supported."""
    if not slicerTooOld():
        return ""
    return (f"<p><b>This Slicer ({slicer.app.applicationVersion}) is too old for this module: it needs "
            f"{SUPPORTED_SLICER}. Install a current Slicer.</b></p>")


def loadTerminology() -> None:
    """Let the Segment Editor's terminology selector know every VL-DUN class (myocardium, tumour sub-regions)."""
    from VLDUNLib.terminology import TERMINOLOGY_FILE

    slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(TERMINOLOGY_FILE))


@parameterNodeWrapper
class VLDUNParameterNode:
    """The module's choices, stored in the scene so they are saved and restored with it.

    weightsPath "" means the shipped default weights; device is one of logic.available_devices() on
    this computer (a scene saved elsewhere may name one absent here: the panel then shows "auto");
    degradationOverride "" lets the model detect the degradation; mirror averages the segmentation
    over 4 mirror images (off: it costs 4x the segmentation pass and blurs away small lesions);
    segmentationTask "auto" segments the detected modality's task (nothing for an unknown scan), else it is
    a task id of the model (VLDUNLogic.tasks()).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    weightsPath: str = ""
    device: str = "auto"
    degradationOverride: str = ""
    mirror: bool = False
    segmentationTask: str = AUTO_TASK


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
    """Module panel: choose volumes and options, run VL-DUN in its worker process, show what it detected."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._createdNodes = []
        self._onCpuAfterOutOfMemory = False
        self._pollTimer = None
        self._taskToolTip = ""

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if slicerTooOld():
            self.layout.addWidget(qt.QLabel(f"This module needs {SUPPORTED_SLICER}; "
                                            f"this is Slicer {slicer.app.applicationVersion}."))
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VLDUN.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VLDUNParameterLogic()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPoll)

        self._fillDegradationComboBox()
        self._fillDeviceComboBox()
        self.ui.progressBar.hide()
        self.ui.outOfDistributionLabel.hide()
        self.ui.segmentationNoteLabel.hide()
        self._taskToolTip = self.ui.taskComboBox.toolTip

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._onWeightsChanged)
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)", self._onWeightsChanged)
        self.ui.degradationComboBox.connect("currentIndexChanged(int)", self._onDegradationChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self._onDeviceChanged)
        self.ui.taskComboBox.connect("currentIndexChanged(int)", self._onTaskChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Closing Slicer or reloading the module ends a running worker; the scene keeps its previous outputs."""
        self._stopJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopJob()
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

    def _fillDeviceComboBox(self) -> None:
        """The devices this computer really has (auto, its GPUs, cpu); asked again after torch is installed."""
        from VLDUNLib.logic import available_devices

        comboBox = self.ui.deviceComboBox
        wasBlocked = comboBox.blockSignals(True)
        comboBox.clear()
        for device in available_devices():
            comboBox.addItem(device, device)
        comboBox.blockSignals(wasBlocked)
        if self._parameterNode:
            self._showUnboundParameters()

    def _fillTaskComboBox(self, weightsPath: str) -> None:
        """Auto, then the tasks of the model `weightsPath` ("" the shipped one), read from its JSON without loading
        the network; a model that cannot be read offers Auto only, and the tooltip says why."""
        tasks, problem = modelTasks(weightsPath)
        comboBox = self.ui.taskComboBox
        wasBlocked = comboBox.blockSignals(True)
        comboBox.clear()
        comboBox.addItem(AUTO_TASK_TEXT, AUTO_TASK)
        for task, label in tasks.items():
            comboBox.addItem(label, task)
        comboBox.toolTip = f"{self._taskToolTip}\n\nOnly Auto is offered: {problem}" if problem else self._taskToolTip
        comboBox.blockSignals(wasBlocked)
        self._showTask()

    def _showTask(self) -> None:
        """Select the stored task; one this model lacks shows Auto, which is then stored: what is shown runs."""
        if not self._parameterNode:
            return
        comboBox = self.ui.taskComboBox
        comboBox.currentIndex = max(comboBox.findData(self._parameterNode.segmentationTask), 0)
        self._onTaskChanged()

    def _showUnboundParameters(self) -> None:
        """Copy weightsPath, device, degradationOverride and segmentationTask into the GUI.

        connectGui cannot bind them: ctkPathLineEdit binds only pathlib paths, and the device and
        degradation names and the model's tasks are known only at run time.
        """
        weightsPath = self._parameterNode.weightsPath
        override = self._parameterNode.degradationOverride
        if weightsPath:
            self.ui.weightsPathLineEdit.currentPath = weightsPath
        self.ui.modelComboBox.currentIndex = CUSTOM_WEIGHTS_INDEX if weightsPath else 0
        self.ui.degradationComboBox.currentIndex = max(self.ui.degradationComboBox.findData(override), 0)
        self.ui.deviceComboBox.currentIndex = max(self.ui.deviceComboBox.findData(self._parameterNode.device), 0)
        self._onWeightsChanged()
        self._onDegradationChanged()
        self._onDeviceChanged()

    def _onWeightsChanged(self) -> None:
        """Store the chosen model and offer its tasks."""
        custom = self.ui.modelComboBox.currentIndex == CUSTOM_WEIGHTS_INDEX
        self.ui.weightsPathLineEdit.enabled = custom
        weightsPath = self.ui.weightsPathLineEdit.currentPath if custom else ""
        if self._parameterNode:
            self._parameterNode.weightsPath = weightsPath
        self._fillTaskComboBox(weightsPath)

    def _onTaskChanged(self) -> None:
        if self._parameterNode and self.ui.taskComboBox.currentData:
            self._parameterNode.segmentationTask = self.ui.taskComboBox.currentData

    def _onDegradationChanged(self) -> None:
        if self._parameterNode:
            self._parameterNode.degradationOverride = self.ui.degradationComboBox.currentData or ""

    def _onDeviceChanged(self) -> None:
        if self._parameterNode and self.ui.deviceComboBox.currentData:
            self._parameterNode.device = self.ui.deviceComboBox.currentData

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._job is not None or not self._parameterNode:
            return
        inputVolume = self._parameterNode.inputVolume
        if inputVolume:
            self.ui.outputVolumeSelector.baseName = f"{inputVolume.GetName()} restored"
            self.ui.outputSegmentationSelector.baseName = f"{inputVolume.GetName()} segmentation"
        problem = self._applyProblem()
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or "Restore the input volume and segment it."

    def _applyProblem(self) -> Optional[str]:  # noqa: UP045 (Python 3.9, Slicer 5.8, evaluates it)
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
        if self._job is not None:
            self._cancel()
            return
        try:
            if dependenciesReady() and self._replacingConfirmed():
                self._fillDegradationComboBox()
                self._fillDeviceComboBox()
                self._onCpuAfterOutOfMemory = False
                self._start(self._parameterNode.device)
        except Exception as error:  # noqa: BLE001 (shown to the user)
            self._fail(error)

    def _replacingConfirmed(self) -> bool:
        """Segments someone drew (not made by VL-DUN) in the chosen output are replaced only after a yes."""
        from VLDUNLib.logic import foreign_segments

        segmentation = self._parameterNode.outputSegmentation
        others = foreign_segments(segmentation) if segmentation else []
        return not others or slicer.util.confirmOkCancelDisplay(
            f"The output segmentation '{segmentation.GetName()}' holds segments VL-DUN did not make:\n\n  "
            + "\n  ".join(others)
            + "\n\nA run replaces all its segments, so these would be deleted. Replace them? Cancel, then choose "
            "'Create new segmentation' as the output, to keep them.",
            "VL-DUN: replace segments?")

    def _start(self, device: str) -> None:
        """Start the worker; `device` is the panel's choice, or "cpu" for this run after the GPU ran out of memory."""
        from VLDUNLib.logic import VLDUNLogic

        parameters = self._parameterNode
        self._createdNodes = self._createMissingOutputs()
        self._clearDetection()
        self._job = VLDUNLogic(parameters.weightsPath or None).job(
            parameters.inputVolume,
            parameters.outputVolume,
            parameters.outputSegmentation,
            device=device,
            degradation_override=parameters.degradationOverride or None,
            mirror=parameters.mirror,
            replace_segments=True,
            task=parameters.segmentationTask,
        )
        try:
            self._job.start()
        except Exception:
            self._job = None
            removeNodes(self._createdNodes)
            raise
        self._setRunning(True)
        self._pollTimer.start()

    def _onPoll(self) -> None:
        """QTimer tick: take the worker's news or write one step of the outputs; each call returns in milliseconds."""
        from VLDUNLib.job import GpuOutOfMemory

        job = self._job
        try:
            finished = job.poll()
        except GpuOutOfMemory as error:
            self._finishJob()
            self._offerCpu(error)
            return
        except Exception as error:  # noqa: BLE001 (shown to the user)
            self._finishJob()
            self._fail(error)
            return
        self._showStatus(job.status)
        if finished:
            if not job.segmented:
                self._removeCreatedSegmentation()
            self._finishJob()
            self._endProgress(self._doneText(job.segmented))
            self._showDetection(job.detection, job.status.note)
            segmentation = self._parameterNode.outputSegmentation if job.segmented else None
            showResults(self._parameterNode.outputVolume, segmentation)

    def _removeCreatedSegmentation(self) -> None:
        """A run that wrote no segmentation leaves none behind that it created; a chosen one stays untouched."""
        created = [node for node in self._createdNodes if node.IsA("vtkMRMLSegmentationNode")]
        removeNodes(created)
        self._createdNodes = [node for node in self._createdNodes if node not in created]

    def _doneText(self, segmented: bool) -> str:
        text = "Done on the CPU: the GPU ran out of memory" if self._onCpuAfterOutOfMemory else "Done"
        return text if segmented else f"{text}, not segmented"

    def _offerCpu(self, error: Exception) -> None:
        """The GPU was too small even one slice at a time: one question, then this run only goes to the CPU."""
        question = f"{error}\n\nRun it on the CPU now? That is slower, but uses the computer's main memory."
        if not slicer.util.confirmOkCancelDisplay(question, "VL-DUN: GPU out of memory"):
            self._endProgress("Stopped: the GPU ran out of memory")
            return
        self._onCpuAfterOutOfMemory = True
        try:
            self._start("cpu")
        except Exception as startError:  # noqa: BLE001 (shown to the user)
            self._fail(startError)

    def _cancel(self) -> None:
        """The worker is ended at once; the outputs are committed in one step, so nothing has changed yet."""
        self._stopJob()
        self._endProgress("Cancelled")

    def _stopJob(self) -> None:
        if self._job is None:
            return
        self._job.cancel()
        self._finishJob()

    def _finishJob(self) -> None:
        """Stop polling; outputs this run created are removed unless it finished."""
        self._pollTimer.stop()
        if not self._job.finished:
            removeNodes(self._createdNodes)
        self._createdNodes = []
        self._job = None
        self._setRunning(False)

    def _fail(self, error: Exception) -> None:
        self.ui.progressBar.hide()
        slicer.util.errorDisplay(f"VL-DUN failed: {error}", detailedText=traceback.format_exc())

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

    def _setRunning(self, running: bool) -> None:
        for section in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                        self.ui.advancedCollapsibleButton):
            section.enabled = not running
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        if running:
            self.ui.applyButton.enabled = True
            self.ui.applyButton.toolTip = "Stop the run now; the scene is left as it was before Apply."
            self.ui.progressBar.show()
            self.ui.progressBar.setRange(0, 0)
        else:
            self._checkCanApply()

    def _showStatus(self, status) -> None:
        """Busy bar with the phase until slices are counted, then slices done and time left."""
        if status.total:
            self.ui.progressBar.setRange(0, status.total)
            self.ui.progressBar.value = status.done
            self.ui.progressBar.format = progressText(status.done, status.total, status.seconds_left)
        self.ui.progressBar.toolTip = status.phase.capitalize()

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
        self.ui.segmentationNoteLabel.hide()

    def _showDetection(self, detection, note: str) -> None:
        """What the prior detected, and `note` (the job's status note) when the run wrote no segmentation."""
        self.ui.modalityLabel.text = detection.modality_text
        self.ui.modalityLabel.toolTip = probabilityTable(detection.modality_probabilities)
        self.ui.detectedDegradationLabel.text = detection.degradation_text
        self.ui.detectedDegradationLabel.toolTip = probabilityTable(detection.degradation_probabilities)
        self.ui.outOfDistributionLabel.visible = detection.out_of_distribution
        self.ui.segmentationNoteLabel.text = note
        self.ui.segmentationNoteLabel.visible = bool(note)
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


def modelTasks(weightsPath: str) -> tuple[dict[str, str], str]:
    """(task id -> label, "") of the model `weightsPath` ("" the shipped one); ({}, why) when it cannot be read."""
    from VLDUNLib.logic import VLDUNLogic

    try:
        return VLDUNLogic(weightsPath or None).tasks(), ""
    except (ValueError, OSError) as error:
        return {}, str(error)


def removeNodes(nodes: list) -> None:
    for node in nodes:
        slicer.mrmlScene.RemoveNode(node)


def showResults(restoredVolume, segmentation) -> None:
    """Show the segmentation (None: the run wrote none) in 3D and the restored volume in the slice views."""
    if segmentation is not None:
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


class VLDUNTest(ScriptedLoadableModuleTest):
    """Real inference with the shipped weights on a small built-in volume (VLDUNLib.selftest), in the worker."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_RestoresAndSegmentsBuiltInVolume()

    def test_RestoresAndSegmentsBuiltInVolume(self) -> None:
        from VLDUNLib.selftest import SelfTestNotRun, run_self_test

        self.delayDisplay("Running VL-DUN on an 8-slice 64 x 64 phantom, on the CPU, with the shipped weights")
        try:
            lines = run_self_test(slicer.mrmlScene)
        except SelfTestNotRun as error:
            self.delayDisplay(str(error))
            self.skipTest(str(error))
        for line in lines:
            self.delayDisplay(line)
        self.delayDisplay("Test passed")
