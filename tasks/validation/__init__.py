"""The validate stage's parts (tasks/validate.py is its entry):

- suite.py: the expectation suite (YAML) built into Great Expectations, run on a frame;
- report.py: the report (JSON, markdown) and the failure message, each failure with its column, count and rows;
- inmemory.py: the whole input as one frame, one validation;
- partitioned.py: inputs bigger than a frame, validated per Dask partition and merged exactly;
- drift.py: reference statistics of accepted data, and drift of new data against them.
"""
