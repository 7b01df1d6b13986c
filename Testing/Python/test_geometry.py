"""ALSQuantLib.geometry: round trips, cases worked by hand, and real MRML nodes."""

import numpy as np
import pytest
from conftest import random_rotation

from ALSQuantLib import geometry
from ALSQuantLib.errors import InputError


def rotation_x(deg):
    t = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def test_mrml_array_round_trip_and_axis_order():
    data = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)  # (i, j, k)
    mrml = geometry.array_to_mrml(data)
    assert mrml.shape == (4, 3, 2)
    assert mrml[3, 2, 1] == data[1, 2, 3]
    np.testing.assert_array_equal(geometry.array_from_mrml(mrml), data)
    vector = np.random.default_rng(0).normal(size=(2, 3, 4, 5))
    assert geometry.array_to_mrml(vector).shape == (4, 3, 2, 5)
    np.testing.assert_array_equal(geometry.array_from_mrml(geometry.array_to_mrml(vector)), vector)
    with pytest.raises(InputError, match="3D"):
        geometry.array_from_mrml(np.zeros((2, 2)))


def test_voxel_sizes_and_direction_cosines():
    affine = np.eye(4)
    affine[:3, :3] = rotation_x(30) @ np.diag([0.5, 0.5, 2.0])
    np.testing.assert_allclose(geometry.voxel_sizes(affine), [0.5, 0.5, 2.0])
    np.testing.assert_allclose(geometry.direction_cosines(affine), rotation_x(30), atol=1e-12)


@pytest.mark.parametrize(
    "linear, expected",
    [
        (np.eye(3), [0, 0, 1]),  # axial
        (np.diag([-1.0, -1.0, 1.0]), [0, 0, 1]),  # LPS-stored axial
        (np.array([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]]), [0, 1, 0]),  # coronal: j runs superior
        (np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]), [0, 1, 0]),  # sagittal: j runs superior
        (rotation_x(30), [0, 0.5, np.sqrt(3) / 2]),  # 30° oblique about the i axis
    ],
)
def test_b0_direction_worked_by_hand(linear, expected):
    affine = np.eye(4)
    affine[:3, :3] = linear @ np.diag([0.9, 0.9, 3.0])  # anisotropic voxels must not change the direction
    np.testing.assert_allclose(geometry.b0_direction_voxel(affine), expected, atol=1e-12)


def test_world_voxel_directions_round_trip_on_random_orientations():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(50, 3))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for _ in range(10):
        affine = np.eye(4)
        affine[:3, :3] = random_rotation(rng) @ np.diag(rng.uniform(0.5, 3.0, 3))
        local = geometry.world_to_voxel_directions(vectors, affine)
        np.testing.assert_allclose(geometry.voxel_to_world_directions(local, affine), vectors, atol=1e-12)


def test_fsl_bvecs_worked_by_hand():
    bvec = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    las = np.diag([-2.0, 2.0, 2.0, 1.0])  # det < 0: FSL frame = voxel frame, i runs to the left
    ras = np.diag([2.0, 2.0, 2.0, 1.0])  # det > 0: FSL flips x
    expected = [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    np.testing.assert_allclose(geometry.fsl_bvecs_to_ras(bvec, las), expected)
    np.testing.assert_allclose(geometry.fsl_bvecs_to_ras(bvec, ras), expected)


def test_fsl_bvecs_same_acquisition_stored_las_or_ras_gives_same_gradients():
    rng = np.random.default_rng(2)
    gradients = rng.normal(size=(20, 3))
    gradients /= np.linalg.norm(gradients, axis=1, keepdims=True)
    las = np.eye(4)
    las[:3, :3] = random_rotation(rng) @ np.diag([-1.0, 1.0, 1.0]) * 2.0
    if np.linalg.det(las[:3, :3]) > 0:
        las[:3, 1] *= -1
    ras = las.copy()
    ras[:3, 0] *= -1  # the same grid with the i axis reversed (as nibabel's orientation flip stores it)
    for affine in (las, ras):
        bvecs = geometry.ras_to_fsl_bvecs(gradients, affine)
        np.testing.assert_allclose(geometry.fsl_bvecs_to_ras(bvecs, affine), gradients, atol=1e-12)
    # FSL bvecs are the same numbers whichever way the file is stored
    np.testing.assert_allclose(geometry.ras_to_fsl_bvecs(gradients, las), geometry.ras_to_fsl_bvecs(gradients, ras))


def test_nrrd_measurement_frame_worked_by_hand():
    # measurement frame columns: axes of the gradient frame in LPS; here the gradient x axis is LPS y
    frame = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    g = geometry.nrrd_gradients_to_ras([[1.0, 0.0, 0.0]], frame, "left-posterior-superior")
    np.testing.assert_allclose(g, [[0.0, -1.0, 0.0]])  # LPS +y (posterior) is RAS −y
    with pytest.raises(InputError, match="space"):
        geometry.space_to_ras("scanner-xyz-unknown")


def test_nrrd_affine_round_trip():
    rng = np.random.default_rng(3)
    affine = np.eye(4)
    affine[:3, :3] = random_rotation(rng) @ np.diag([0.9, 0.9, 5.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    directions, origin = geometry.nrrd_from_affine(affine)
    np.testing.assert_allclose(geometry.affine_from_nrrd(directions, origin, "left-posterior-superior"), affine)


def test_voxel_grid_affine_is_centred():
    affine = geometry.voxel_grid_affine((10, 20, 5), (2.0, 1.0, 4.0), center=(1.0, 2.0, 3.0))
    centers = geometry.voxel_centers_world((10, 20, 5), affine)
    np.testing.assert_allclose(centers.reshape(-1, 3).mean(axis=0), [1.0, 2.0, 3.0], atol=1e-9)
    np.testing.assert_allclose(centers[1, 0, 0] - centers[0, 0, 0], [2.0, 0.0, 0.0])


def test_conventions_agree_with_real_mrml_volume_node(mrml_scene):
    """A nibabel-ordered array put into a real vtkMRMLScalarVolumeNode lands at the same RAS positions."""
    import slicer
    import slicer.util

    rng = np.random.default_rng(4)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)  # (i, j, k)
    affine = np.eye(4)
    affine[:3, :3] = rotation_x(20) @ np.diag([1.5, 1.0, 2.5])
    affine[:3, 3] = [-3.0, 4.0, 5.0]
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(affine))
    slicer.util.updateVolumeFromArray(node, geometry.array_to_mrml(data))

    image = node.GetImageData()
    assert image.GetDimensions() == (5, 6, 7)  # VTK dimensions are (i, j, k)
    for i, j, k in [(0, 0, 0), (4, 1, 2), (1, 5, 6), (3, 2, 1)]:
        assert image.GetScalarComponentAsDouble(i, j, k, 0) == pytest.approx(float(data[i, j, k]))
    vtk_matrix = slicer.util.vtkMatrixFromArray(np.eye(4))
    node.GetIJKToRASMatrix(vtk_matrix)
    matrix = slicer.util.arrayFromVTKMatrix(vtk_matrix)
    np.testing.assert_allclose(matrix, affine, atol=1e-12)
    np.testing.assert_array_equal(geometry.array_from_mrml(slicer.util.arrayFromVolume(node)), data)


def test_itk_round_trip_and_agreement_with_ants(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(5)
    affine = np.eye(4)
    affine[:3, :3] = random_rotation(rng) @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [12.0, -7.0, 30.0]
    origin, spacing, direction = geometry.itk_from_affine(affine)
    np.testing.assert_allclose(geometry.affine_from_itk(origin, spacing, direction), affine, atol=1e-12)
    ants = pytest.importorskip("ants")
    data = rng.normal(size=(4, 5, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "img.nii.gz")
    image = ants.image_read(str(tmp_path / "img.nii.gz"))  # ANTs' own reading of the NIfTI
    np.testing.assert_allclose(image.origin, origin, atol=1e-4)
    np.testing.assert_allclose(image.spacing, spacing, atol=1e-5)
    np.testing.assert_allclose(image.direction, direction, atol=1e-5)
    np.testing.assert_allclose(image.numpy(), data)
