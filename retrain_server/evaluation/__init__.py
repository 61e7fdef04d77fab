"""Offline evaluation on real grocery data, one concern per module.

* :mod:`.protocol` — the time split, one held-out product per basket, HR@k / MRR@k,
  standard errors;
* :mod:`.baselines` — most popular, raw co-occurrence, the member's own favourites;
* :mod:`.tuning` — everything chosen on the validation month (guest knobs, decay
  half-lives, the member blend's weights, neighbours, Two-Tower recency);
* :mod:`.rerank` — a learned reranker over the member blend's best candidates
  (an experiment: reported, not shipped);
* :mod:`.report` — rows, goals, the markdown table;
* :mod:`.run` — the whole protocol (:func:`~.run.run_evaluation`);
* :mod:`.datasets` — Complete Journey and the Instacart sample;
* :mod:`.cli` — ``retrain-server evaluate``.

``retrain_server.evaluate`` re-exports the public names for older imports.
"""

__all__: list[str] = []
