"""Balance: what each epoch trains and how that is judged. A pure function of (dataset, seed, epoch) for the
schedule; the held-out split; reports of expected and actual images per concept; the rebalancing rules.

schedule (exact per-epoch counts, buckets, batches) -> holdout (validation images) -> report (tables, plots);
autobalance (rules over a run's records) -> suggest (the same rules, proposed, not applied).
"""
