"""MRML nodes ↔ arrays and `ALSQuantLib` objects.

Arrays follow nibabel's (i, j, k) order and affines map voxel indices to RAS, exactly a volume node's IJK→RAS
matrix; the axis reordering is `ALSQuantLib.geometry`'s, so there is one convention in the project.
"""

import numpy as np
import slicer
import vtk

from ALSQuantLib import geometry, io
from ALSQuantLib.errors import InputError


def ijkToRas(volumeNode):
    """The node's IJK→RAS matrix as a 4×4 array."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def imageFromVolume(volumeNode, what="volume"):
    """(array in (i, j, k[, n]) order, affine) of a volume node."""
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise InputError(f"{what}: no volume selected, or it holds no image")
    return geometry.array_from_mrml(slicer.util.arrayFromVolume(volumeNode)).copy(), ijkToRas(volumeNode)


def maskOnGrid(maskNode, shape, affine, what):
    """A mask node's voxels (non-zero = inside) as a boolean array, refused unless on the grid of `shape`, `affine`."""
    mask, maskAffine = imageFromVolume(maskNode, "mask")
    if not geometry.same_grid(mask.shape, maskAffine, shape, affine):
        raise InputError(f"mask {maskNode.GetName()}: not on the {what}'s grid")
    return mask > 0


def volumeFromImage(scene, array, affine, name, *, className="vtkMRMLScalarVolumeNode", node=None):
    """A volume node (new, or `node` updated) holding `array` (i, j, k) with the geometry of `affine`."""
    if node is None:
        node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(affine, dtype=float)))
    slicer.util.updateVolumeFromArray(node, geometry.array_to_mrml(array))
    node.CreateDefaultDisplayNodes()
    return node


def dwiFromNode(dwiNode):
    """`ALSQuantLib.io.DWI` from a ``vtkMRMLDiffusionWeightedVolumeNode``: gradients taken to RAS through the node's
    measurement frame."""
    if dwiNode is None or not dwiNode.IsA("vtkMRMLDiffusionWeightedVolumeNode"):
        raise InputError("DWI: expected a diffusion-weighted volume node (vtkMRMLDiffusionWeightedVolumeNode)")
    data, affine = imageFromVolume(dwiNode, "DWI")
    n = dwiNode.GetNumberOfGradients()
    bvals = np.array([dwiNode.GetBValue(i) for i in range(n)])
    gradients = np.array([dwiNode.GetDiffusionGradient(i) for i in range(n)]).reshape(-1, 3)
    frame = vtk.vtkMatrix4x4()
    dwiNode.GetMeasurementFrameMatrix(frame)
    bvecs = gradients @ slicer.util.arrayFromVTKMatrix(frame)[:3, :3].T
    norms = np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs = np.divide(bvecs, norms, out=np.zeros_like(bvecs), where=norms > 0)
    return io.DWI(data, affine, bvals, bvecs, source=dwiNode.GetName())


def dwiNodeFromDWI(scene, dwi, name):
    """A ``vtkMRMLDiffusionWeightedVolumeNode`` from an `ALSQuantLib.io.DWI` (gradients in RAS, identity frame)."""
    node = volumeFromImage(
        scene, dwi.data.astype(np.float32), dwi.affine, name, className="vtkMRMLDiffusionWeightedVolumeNode"
    )
    node.SetNumberOfGradients(len(dwi.bvals))
    for i, (b, g) in enumerate(zip(dwi.bvals, dwi.bvecs)):
        node.SetBValue(i, float(b))
        node.SetDiffusionGradient(i, [float(v) for v in g])
    node.SetMeasurementFrameMatrix(slicer.util.vtkMatrixFromArray(np.eye(4)))
    return node


def tableFromRows(scene, rows, name, *, node=None):
    """A table node (new, or `node` refilled) from a list of dicts: numeric columns as doubles, others as text."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table = node.GetTable()
    table.Initialize()
    columns = list(rows[0]) if rows else []
    for column in columns:
        values = [row.get(column) for row in rows]
        numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)
        array = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        array.SetName(column)
        for v in values:
            array.InsertNextValue(float(v) if numeric else ("" if v is None else str(v)))
        table.AddColumn(array)
    node.Modified()
    return node


def rowsFromTable(tableNode):
    """A table node's rows as dicts of strings (the form `ALSQuantLib.io.read_table` gives)."""
    if tableNode is None:
        raise InputError("table: no table node selected")
    table = tableNode.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [
        {names[c]: table.GetValue(r, c).ToString() for c in range(len(names))} for r in range(table.GetNumberOfRows())
    ]


def colorTableFromEntries(scene, entries, name):
    """A ``vtkMRMLColorTableNode`` from (value, name, (r, g, b)) entries, colours 0-255."""
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", scene.GenerateUniqueName(name))
    node.SetTypeToUser()
    size = max(int(value) for value, _, _ in entries) + 1 if entries else 1
    node.SetNumberOfColors(size)
    for value in range(size):
        node.SetColor(value, "", 0, 0, 0, 0)
    for value, label, rgb in entries:
        node.SetColor(int(value), label, *(c / 255.0 for c in rgb), 1.0)
    return node


def linearTransformFromItkFile(scene, path, name):
    """A linear transform node from an ITK/ANTs affine file (``.mat``).

    An ITK registration transform maps points of the fixed image (the template) to the moving one (the subject), in
    LPS: it is Slicer's "transform from parent" once converted to RAS, so placing the subject's volume under this
    node shows it aligned with the template (as Slicer's own loader does with such files).
    """
    import SimpleITK as sitk

    transform = sitk.ReadTransform(str(path))
    dimension = transform.GetDimension()
    parameters = np.array(transform.GetParameters())
    matrix = parameters[: dimension * dimension].reshape(3, 3)
    translation = parameters[dimension * dimension :]
    center = np.array(transform.GetFixedParameters())
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + center - matrix @ center
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", scene.GenerateUniqueName(name))
    node.SetMatrixTransformFromParent(slicer.util.vtkMatrixFromArray(flip @ lps @ flip))
    return node
