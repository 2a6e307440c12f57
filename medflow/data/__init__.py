"""Getting data in: fetch (resume, sha256), safe archives, manifest and patient ids, grouped split, GX suites."""
