"""Files: checkpoints that describe their model (checkpoint.py), data sets (data.py) and
certification results in Cohen et al.'s TSV format (results.py)."""
