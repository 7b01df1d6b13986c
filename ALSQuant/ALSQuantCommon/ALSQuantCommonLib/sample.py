"""Sample data, built offline: a simulated subject (`ALSQuantLib.phantom`) loaded into nodes."""

from dataclasses import dataclass

from ALSQuantLib import phantom

from . import nodes


@dataclass
class SampleSubject:
    """The nodes of a sample subject, and its ground truth (subject values and truth maps as arrays)."""

    dwi: object
    magnitude: object
    phase: object
    echoTimes: list
    fieldStrength: float
    truthLabels: object
    values: dict
    truth: object


def loadSampleSubject(scene, *, group="ALS", seed=1, config=None):
    """Simulate one subject and add a DWI node (with its gradients), GRE magnitude and phase volumes (one per
    echo), and its true labels (a label map on the DWI grid) to `scene`."""
    subject = phantom.simulate_subject(group, seed, config or phantom.PhantomConfig())
    prefix = f"ALSQuantSample_{group}"
    dwi = nodes.dwiNodeFromDWI(scene, subject.dwi, f"{prefix}_DWI")
    gre = subject.gre
    echoes = gre.magnitude.shape[3]
    magnitude = [
        nodes.volumeFromImage(scene, gre.magnitude[..., e], gre.affine, f"{prefix}_GRE_magnitude_echo{e + 1}")
        for e in range(echoes)
    ]
    phase = [
        nodes.volumeFromImage(scene, gre.phase[..., e], gre.affine, f"{prefix}_GRE_phase_echo{e + 1}")
        for e in range(echoes)
    ]
    labels = nodes.volumeFromImage(
        scene,
        subject.truth_dwi["label"],
        subject.dwi.affine,
        f"{prefix}_true_labels",
        className="vtkMRMLLabelMapVolumeNode",
    )
    return SampleSubject(
        dwi, magnitude, phase, list(gre.echo_times), gre.field_strength, labels, subject.values, subject
    )
