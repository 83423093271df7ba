"""Systems of the paper's Tables 2-5 that we do not rerun, and why.

Their P/R/F1 are the paper's copied numbers, kept in :mod:`reports.paper` (the one source of
every copied number); :func:`reported_table` joins them with the reasons below. The paper's
one-line descriptions (CRENER §5.2) are the basis of each ``needs`` entry; the rerun systems
(CRENER, W²NER) and our extra baselines (BERT-Softmax, BERT-CRF, TENER) are not listed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from reports.paper import TABLE_DATASET, paper_table


@dataclass(frozen=True)
class ReportedSystem:
    name: str  # exactly as in the paper's tables (reports.paper rows)
    citation: int  # reference number in the CRENER paper
    needs: str  # the external resource or modality the method depends on
    reason: str  # one line: why it is not rerun here


REPORTED: dict[str, ReportedSystem] = {
    s.name: s
    for s in (
        ReportedSystem(
            "CAN-NER",
            45,
            "Gigaword-pretrained character embeddings (Lattice-LSTM lineage)",
            "no official code, and the pretrained Gigaword vectors it starts from are unavailable here",
        ),
        ReportedSystem(
            "SoftLexicon",
            46,
            "a word lexicon with pretrained word embeddings",
            "needs a lexicon (e.g. the CTB 50-d word vectors) that is unavailable here",
        ),
        ReportedSystem(
            "MSFM",
            47,
            "word-boundary, radical and pinyin features of characters",
            "needs segmentation, radical and pinyin resources that are unavailable here",
        ),
        ReportedSystem(
            "MECT",
            48,
            "a lexicon lattice plus character-structure (radical) data",
            "needs a lexicon and radical decompositions that are unavailable here",
        ),
        ReportedSystem(
            "NER-MC",
            19,
            "word-boundary information",
            "needs a segmenter or lexicon for its word-boundary features, unavailable here",
        ),
        ReportedSystem(
            "Token-Relation",
            20,
            "latent-word (lexicon) semantics",
            "needs a lexicon of latent words that is unavailable here",
        ),
        ReportedSystem(
            "VisPhone",
            49,
            "glyph images and speech (phonetic) features of characters",
            "needs glyph images and speech features that are unavailable here",
        ),
        ReportedSystem(
            "DAE-NER",
            50,
            "character- and sentence-level attention enhancement modules",
            "no implementation available to this project; reimplementing it from the paper alone is out of scope",
        ),
        ReportedSystem(
            "MFT",
            51,
            "radical ('word root') information of Chinese characters",
            "needs radical decompositions that are unavailable here",
        ),
    )
}


def reported_table() -> pd.DataFrame:
    """One row per (not-rerun system, dataset) of Tables 2-5: the paper's P/R/F1 and note,
    plus ``needs`` and ``reason``. Systems absent from a table (e.g. MSFM on OntoNotes) have no row.
    """
    frames = []
    for n in TABLE_DATASET:
        df = paper_table(n)
        df = df[df.system.isin(REPORTED)].copy()
        df["table"] = n
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out["needs"] = out.system.map(lambda s: REPORTED[s].needs)
    out["reason"] = out.system.map(lambda s: REPORTED[s].reason)
    return out[["table", "dataset", "system", "precision", "recall", "f1", "note", "needs", "reason"]]
