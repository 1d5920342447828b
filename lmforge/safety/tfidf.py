"""A linear moderator on TF-IDF features (scikit-learn): the strong cheap baseline.

Word 1-2-grams and character 2-5-grams inside word boundaries (so "kil1" and "killing"
share features), sublinear term frequency, one logistic regression per category with
balanced class weights. Trains in a second or two on a few thousand texts; it is the
baseline `benchmarks/moderation.py` measures lmforge's trained classifier against, and
the refusal judge's model (`lmforge.safety.refusal`).
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.errors import DataError


class TfidfClassifier:
    """Multi-label: `scores(texts)` gives each category's probability."""

    def __init__(self, categories: Sequence[str], C: float = 8.0, seed: int = 0):
        self.categories = tuple(categories)
        self.thresholds = dict.fromkeys(self.categories, 0.5)
        self.C, self.seed = C, seed
        self._features = None
        self._models: dict[str, object] = {}

    def fit(self, texts: Sequence[str], labels: Sequence[Sequence[str]]) -> TfidfClassifier:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import FeatureUnion

        self._features = FeatureUnion([
            ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, lowercase=True)),
            ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)),
        ])
        matrix = self._features.fit_transform(list(texts))
        for category in self.categories:
            target = [int(category in y) for y in labels]
            if len(set(target)) < 2:
                raise DataError(f"category {category!r} needs both positive and negative examples to train")
            model = LogisticRegression(C=self.C, class_weight="balanced", max_iter=2000, random_state=self.seed)
            self._models[category] = model.fit(matrix, target)
        return self

    def scores(self, texts: list[str]) -> list[dict[str, float]]:
        if not texts:
            return []
        if self._features is None:
            raise RuntimeError("TfidfClassifier.scores before fit")
        matrix = self._features.transform(list(texts))
        columns = {c: m.predict_proba(matrix)[:, 1] for c, m in self._models.items()}
        return [{c: float(columns[c][i]) for c in self.categories} for i in range(len(texts))]
