"""The scan: a data root's folders walked, image headers and captions read (cached in a manifest), and the
per-folder multiply.txt / loss_scale.txt turned into a Dataset of plain numbers that everything downstream uses.

walk (folders) -> readpool, imageheader, manifest (reading files fast) -> images (sizes, captions) -> scan (Dataset).
The public names are edtools' own (`edtools.scan`, `edtools.Dataset`, ...).
"""
