"""NTM, DNC and VMED cells: a training forward over whole sequences and a serving step over
a state pool. The models arrive with their issues; this package is their home."""
