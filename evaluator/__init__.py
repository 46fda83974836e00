"""The trusted side of the harness: workloads, the candidate contract, scoring, the sandbox.

`evaluator` never imports `adrs`. Candidate code imports only `evaluator.contract`.
"""
