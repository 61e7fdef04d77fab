"""Offline evaluation on real grocery data, one concern per module.

* :mod:`.protocol` — the time split, one held-out product per basket, HR@k / MRR@k,
  standard errors;
* :mod:`.baselines` — most popular, raw co-occurrence, the member's own favourites;
* :mod:`.tuning` — everything chosen on the validation month (guest knobs, decay
  half-lives, the member blend's weights, neighbours, Two-Tower recency);
* the member reranker is fitted by :mod:`retrain_server.rerank` (shared with the
  nightly job) and reported as the shipped member row;
* :mod:`.report` — rows, goals, the markdown table;
* :mod:`.run` — the whole protocol (:func:`~.run.run_evaluation`);
* :mod:`.datasets` — Complete Journey and the Instacart sample;
* :mod:`.cli` — ``retrain-server evaluate``.

``retrain_server.evaluate`` re-exports the public names for older imports.
"""

__all__: list[str] = []
