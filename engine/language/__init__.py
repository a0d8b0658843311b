"""Text side of the pipeline: entities and the offline extractor's language data.

Modules, each importing only those after it (no cycle, nothing imported lazily to break one):

    noun_phrases  the offline extractor: noun-phrase chunks of a caption -> entities
    entities      the entity schema, parsing of an LLM answer, normalisation of any extractor's entities
    lexicon       the noun lexicon precomputed from WordNet, and the rules that compute it
    nltk_data     the NLTK data folder: where it is, what it holds, how it is installed

This package imports no stage and no backend; stages import it.
"""
