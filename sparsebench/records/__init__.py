"""What a run leaves behind: the run folder's claim and fingerprint (ledger), results.json
and wandb (tracking), the exported pruned model (export), the end-of-run and end-of-sweep
summaries (summary) and the sweep report with its tables and plots (report).

May import: the package's foundations (errors, registry) and evaluation/'s task table (a
report names the zero-shot tasks); nothing that prunes or trains: a report reads results.json
files, never a model.
"""
