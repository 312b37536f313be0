"""Recall and rank: several candidate sources, then a ranker over their union.

A request's behaviour is the bounded sequence the feature store keeps (``history.py``); each source
(one module each) proposes items with a score from it; ``pairs.py`` describes each candidate against
the user's behaviour; ``ranker.py`` learns to order the candidates; ``two_stage.py`` joins them.
"""
