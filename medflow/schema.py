"""Column contracts between steps: the one place each table's columns are named."""

from __future__ import annotations

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom"})
# A file with any other name is an image too when it carries DICOM's DICM marker at offset 128
# (medflow.imaging.dicom.is_dicom_file): DICOM files often have no extension, or a number after a dot.

# OS junk never indexed or extracted.
JUNK_DIRS = frozenset({"__MACOSX", ".Trash", ".Trashes", ".Spotlight-V100", ".fseventsd", "@eaDir"})
JUNK_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "ehthumbs.db"})

SPLITS = ("train", "val", "test")
# Folder names that carry a source's own split -> medflow split name.
SOURCE_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                      "validation": "val", "test": "test", "testing": "test"}

# The manifest, clean and split tables are folders (data/interim/<ds>/manifest/, clean/; data/processed/<ds>/split/)
# of CSV parts, one per source root (``root``), in the table's row order (medflow.io.TableWriter, read_csv): an
# increment that adds a root adds a part, and DVC stores the new rows alone. The rejects files are single CSVs.

# The manifest table: one row per image file found under the roots.
#   path          readable path, relative to the project root (``../`` for a folder outside it; links kept)
#   relpath       path relative to its root (stable across machines)
#   root          the root folder it was found under (relative to the project root, like path)
#   class_name    nearest ancestor folder that is a key of dataset.labels
#   label         dataset.labels[class_name]
#   group         patient/group id from dataset.group_rule applied to the file name
#   source_split  train/val/test when an ancestor folder says so, else empty
#   sha256, bytes, width, height, mode, format: from the file and its header (no full decode);
#   width/height/mode/format are empty when the header cannot be read (filter rejects those).
MANIFEST_COLUMNS = ["path", "relpath", "root", "class_name", "label", "group", "source_split",
                    "sha256", "bytes", "width", "height", "mode", "format"]

# The clean table = manifest rows that decoded fine, one per distinct sha256, plus:
#   phash       64-bit perceptual hash, 16 hex digits
#   dup_group   near-duplicate group id (the sha256 of the group's first member; singletons: own sha256)
CLEAN_COLUMNS = [*MANIFEST_COLUMNS, "phash", "dup_group"]

# rejects.csv: one row per quarantined file (never deleted).
#   reason: zero_bytes | not_an_image | truncated | decode_error | too_many_pixels | too_small |
#           unsupported_mode | no_pixel_data | multi_frame | unsupported_syntax (the last three: DICOM) |
#           unreadable (a broken link, a FIFO/device, no permission, a non-UTF-8 name) | duplicate
REJECT_COLUMNS = ["path", "reason", "detail", "sha256", "bytes"]
# resize_rejects.csv (the resize step's) = REJECT_COLUMNS plus row (in the clean table and the image store, no
# pixels),
#   reason resize_decode_error: a file the filter passed that resize cannot decode; the split quarantines it.
# split_rejects.csv (the split step's) = REJECT_COLUMNS plus row and links: resize's rows and links_splits.

# The split table = clean rows plus:
#   row          row of this image in the image store (= its position in the clean table)
#   split_group  the unit the split keeps together (patients joined through near-duplicate groups)
#   split        train | val | test
SPLIT_COLUMNS = [*CLEAN_COLUMNS, "row", "split_group", "split"]
