"""ALSQuant compute library: DKI/DTI, QSM, atlas labelling and ROC diagnosis for ALS imaging biomarkers.

Importable without Slicer, Qt or VTK; heavy optional imports (antspyx, matplotlib) happen inside the functions that
need them.
"""

__version__ = "0.1.0"
