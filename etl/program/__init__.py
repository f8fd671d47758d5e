"""The program's view (issue 25): numbers per program from the warehouse (report), charts (SVG,
matplotlib) and the page with its CSVs (page)."""
