"""Code shared by the ALSQuant modules, importable without Qt: MRML node ↔ `ALSQuantLib` conversion, background
processes, dependency installation and sample data."""
