"""alsquant import: DICOM series written with pydicom (known voxels, b-values, gradients, echo times), and a real GE
scanner's DWI series, converted by the real dcm2niix, filed into the BIDS layout the pipeline reads."""

from pathlib import Path

import numpy as np
import pytest

from ALSQuantLib import cli, dicom, io, pipeline
from ALSQuantLib.errors import InputError

pydicom = pytest.importorskip("pydicom")

GE_DWI = Path(__file__).parents[1] / "Data" / "dcm_qa_ge"  # a real GE DWI (its README says where from)
SHAPE = (16, 12, 6)  # columns (x), rows (y), slices
SPACING = 2.0


def _write_series(folder, volumes, *, number, description, image_type, echo_times, bvalues=None, vectors=None):
    """One DICOM series, one file a slice a volume, axial, patient LPS axes along the image's: volume k is
    `volumes[k]` (x, y, z) with echo time `echo_times[k]` (ms), or b-value `bvalues[k]` and gradient `vectors[k]`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    for k, volume in enumerate(volumes):
        for z in range(volume.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
            ds.Modality, ds.Manufacturer, ds.PatientID, ds.PatientName = "MR", "SIEMENS", "P1", "Test^Subject"
            ds.PatientPosition = "HFS"
            ds.StudyInstanceUID, ds.FrameOfReferenceUID = "1.2.3.4", "1.2.3.4.5"
            ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series, number, description
            ds.ProtocolName = description
            ds.InstanceNumber = k * volume.shape[2] + z + 1
            ds.StudyDate, ds.StudyTime, ds.SeriesTime, ds.AcquisitionTime = "20260101", "120000", "120000", "120000"
            ds.ImageType = image_type
            ds.MagneticFieldStrength, ds.RepetitionTime = 3.0, 40.0
            ds.EchoTime = echo_times[k]
            ds.EchoNumbers = k + 1 if bvalues is None and len(volumes) > 1 else 1
            ds.AcquisitionNumber = k + 1
            ds.ScanningSequence = "GR" if bvalues is None else "EP"
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = (ORIGIN_LPS + [0, 0, SPACING * z]).tolist()
            ds.SliceLocation = ORIGIN_LPS[2] + SPACING * z
            ds.PixelSpacing, ds.SliceThickness = [SPACING, SPACING], SPACING
            ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            if bvalues is not None:
                ds.add_new((0x0018, 0x9087), "FD", float(bvalues[k]))  # DiffusionBValue
                ds.add_new((0x0018, 0x9089), "FD", [float(v) for v in vectors[k]])  # DiffusionGradientOrientation
            ds.PixelData = np.ascontiguousarray(volume[:, :, z].T.astype(np.uint16)).tobytes()
            ds.save_as(folder / f"{number:02d}_{k:02d}_{z:02d}.dcm", enforce_file_format=True)


ORIGIN_LPS = np.array([-10.0, -8.0, -4.0])  # the first voxel's patient position (ImagePositionPatient of slice 0)


def _as_stored(volume, affine, shape):
    """`volume` (indexed as written into the DICOM: x along the rows, y down the columns, z the slices) on a NIfTI
    grid (`affine`, `shape`), voxel by voxel through its patient position: NIfTI's RAS point p is DICOM's LPS point
    (-p_x, -p_y, p_z). Nothing about dcm2niix's voxel order is assumed."""
    ijk = np.indices(shape[:3]).reshape(3, -1)
    lps = (affine[:3, :3] @ ijk + affine[:3, 3:]) * np.array([[-1.0], [-1.0], [1.0]])
    index = (lps - ORIGIN_LPS[:, None]) / SPACING
    assert np.allclose(index, np.round(index), atol=1e-3), "the NIfTI grid is the DICOM's"
    x, y, z = np.round(index).astype(int)
    return np.asarray(volume)[x, y, z].reshape(shape[:3] + np.shape(volume)[3:])


@pytest.fixture(scope="module")
def scanner(tmp_path_factory):
    """A session's DICOM: a 2-echo GRE as magnitude and phase series (Siemens image types), a DWI with standard
    diffusion tags (b 0, 1000, 2500), and a localizer."""
    root = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(3)
    magnitude = [rng.integers(500, 1500, SHAPE) for _ in range(2)]
    phase = [rng.integers(0, 4096, SHAPE) for _ in range(2)]
    bvalues = [0, 1000, 1000, 1000, 2500, 2500]
    vectors = [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0], [0, 0.6, 0.8]]
    dwi = [rng.integers(100, 1000, SHAPE) for _ in bvalues]
    gre = {"description": "QSM_GRE", "echo_times": [10.0, 20.0]}
    _write_series(root / "s5", magnitude, number=5, image_type=["ORIGINAL", "PRIMARY", "M", "ND"], **gre)
    _write_series(root / "s6", phase, number=6, image_type=["ORIGINAL", "PRIMARY", "P", "ND"], **gre)
    _write_series(
        root / "s7",
        dwi,
        number=7,
        description="DKI",
        image_type=["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"],
        echo_times=[90.0] * len(bvalues),
        bvalues=bvalues,
        vectors=vectors,
    )
    localizer = [rng.integers(0, 100, SHAPE)]
    _write_series(
        root / "s1",
        localizer,
        number=1,
        description="localizer",
        image_type=["ORIGINAL", "PRIMARY", "M"],
        echo_times=[5.0],
    )
    return root, {"magnitude": magnitude, "phase": phase, "dwi": dwi, "bvalues": bvalues, "vectors": vectors}


def _needs_dcm2niix():
    try:
        dicom.dcm2niix_path()
    except InputError:
        pytest.skip("dcm2niix not installed (pip install dcm2niix)")


def test_import_files_a_session_where_the_pipeline_finds_it(scanner, tmp_path, capsys):
    _needs_dcm2niix()
    root, truth = scanner
    dataset = tmp_path / "bids"
    args = ["import", str(root), "--out", str(dataset), "--subject", "sub-07", "--session", "01", "--group", "ALS"]
    assert cli.main(args) == 0
    assert "left out: 1_localizer" in capsys.readouterr().out
    inputs = pipeline.find_subject(dataset, "sub-07", pipeline.Selection(session="ses-01"))
    assert inputs.dwi.name == "sub-07_ses-01_dwi.nii.gz"
    assert [p.name for p in inputs.gre_phase] == [f"sub-07_ses-01_echo-{k}_part-phase_T2starw.nii.gz" for k in (1, 2)]
    assert io.read_table(dataset / "participants.tsv") == [{"participant_id": "sub-07", "group": "ALS"}]

    # The voxels, b-values, gradients, echo times and field as written into the DICOM. The gradients are in the
    # patient's LPS axes there, in RAS once read (a direction's sign does not matter in diffusion).
    dwi = io.read_dwi(inputs.dwi)
    np.testing.assert_array_equal(dwi.data, _as_stored(np.stack(truth["dwi"], axis=3), dwi.affine, dwi.data.shape))
    np.testing.assert_allclose(np.abs(np.linalg.eigvals(dwi.affine[:3, :3])), SPACING)
    np.testing.assert_allclose(dwi.bvals, truth["bvalues"])
    expected = np.array(truth["vectors"]) * [-1, -1, 1]
    weighted = np.array(truth["bvalues"]) > 0
    alignment = np.abs(np.sum(dwi.bvecs[weighted] * expected[weighted], axis=1))
    np.testing.assert_allclose(alignment, 1.0, atol=1e-4)
    gre = io.read_gre(inputs.gre_magnitude, inputs.gre_phase)
    np.testing.assert_allclose(gre.echo_times, [0.010, 0.020])
    assert gre.field_strength == 3.0
    for echo in (0, 1):
        np.testing.assert_array_equal(
            gre.phase[..., echo], _as_stored(truth["phase"][echo], gre.affine, gre.phase.shape)
        )
        np.testing.assert_array_equal(
            gre.magnitude[..., echo], _as_stored(truth["magnitude"][echo], gre.affine, gre.phase.shape)
        )

    # A second import of the same session writes nothing new; a different one into the same place is refused
    assert cli.main(args) == 0
    other = [np.full(SHAPE, 300 + k) for k in range(len(truth["bvalues"]))]
    scan = {"image_type": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"], "echo_times": [90.0] * len(other)}
    _write_series(
        tmp_path / "rescan",
        other,
        number=9,
        description="DKI",
        **scan,
        bvalues=truth["bvalues"],
        vectors=truth["vectors"],
    )
    with pytest.raises(InputError, match="sub-07_ses-01_dwi.nii.gz, .*: exist and differ"):
        dicom.import_dicom(tmp_path / "rescan", dataset, "sub-07", session="ses-01")
    assert np.array_equal(io.read_dwi(inputs.dwi).data, dwi.data)  # nothing overwritten
    # A conflict found late (the GRE's, after the DWI's files were planned) leaves the session as it was
    anat = dataset / "sub-07" / "ses-02" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-07_ses-02_echo-1_part-mag_T2starw.json").write_text("{}")
    with pytest.raises(InputError, match="part-mag_T2starw.json: exists and differs.*nothing was written"):
        dicom.import_dicom(root, dataset, "sub-07", session="02")
    left = sorted(p.relative_to(anat.parent).as_posix() for p in anat.parent.rglob("*") if p.is_file())
    assert left == ["anat/sub-07_ses-02_echo-1_part-mag_T2starw.json"]  # no DWI filed before the conflict
    with pytest.raises(InputError, match="expected a BIDS label such as sub-01"):
        dicom.import_dicom(root, dataset, "07")


def test_import_files_a_real_ge_dwi_with_every_pixel_in_its_place(tmp_path):
    """The study's scanner is a GE: a real GE DWI series (two oblique slices, b 0 and six directions at 1000, GE's
    private diffusion tags, file names without an extension) imported; its b-values and gradients as dcm2niix's
    authors' reference conversion of the same files has them, and every pixel of every DICOM file at its patient
    position in the NIfTI (read with pydicom, placed by its own ImagePositionPatient / ImageOrientationPatient).
    The validation set repeats one b = 0 image in every volume (it tests headers), so this places slices and pixels,
    not volumes, and no tensor can be fitted from it."""
    _needs_dcm2niix()
    dataset = tmp_path / "bids"
    assert cli.main(["import", str(GE_DWI / "01_Ax_DWI_TENSOR_R2"), "--out", str(dataset), "--subject", "sub-01"]) == 0
    dwi_path = dataset / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    for suffix in (".bval", ".bvec"):
        np.testing.assert_allclose(
            np.loadtxt(dwi_path.with_name("sub-01_dwi" + suffix)),
            np.loadtxt(GE_DWI / ("Ax_DWI_TENSOR_R2_1" + suffix)),
            atol=1e-6,
        )
    assert io.read_json(dwi_path.with_name("sub-01_dwi.json"))["Manufacturer"] == "GE"
    dwi = io.read_dwi(dwi_path)
    assert dwi.data.shape == (256, 256, 2, 7)
    np.testing.assert_allclose(dwi.bvals, [0] + [1000] * 6)
    np.testing.assert_allclose(np.linalg.norm(dwi.bvecs[1:], axis=1), 1.0, atol=1e-5)

    to_voxel = np.linalg.inv(dwi.affine)
    files = sorted((pydicom.dcmread(path) for path in (GE_DWI / "01_Ax_DWI_TENSOR_R2").iterdir()), key=_instance)
    slices = dwi.data.shape[2]
    assert len(files) == slices * dwi.data.shape[3]
    for ds in files:
        rows, columns = np.indices(ds.pixel_array.shape)
        row_step, column_step = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        cosines = np.array(ds.ImageOrientationPatient, dtype=float).reshape(2, 3)  # along a row, along a column
        lps = (
            np.array(ds.ImagePositionPatient, dtype=float)[:, None]
            + np.outer(cosines[0], columns.ravel() * column_step)
            + np.outer(cosines[1], rows.ravel() * row_step)
        )
        ras = lps * np.array([[-1.0], [-1.0], [1.0]])
        ijk = to_voxel[:3, :3] @ ras + to_voxel[:3, 3:]
        np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-2)  # on the NIfTI's grid
        i, j, k = np.round(ijk).astype(int)
        volume = (_instance(ds) - 1) // slices
        np.testing.assert_array_equal(dwi.data[i, j, k, volume], ds.pixel_array.ravel())


def _instance(ds):
    return int(ds.InstanceNumber)
