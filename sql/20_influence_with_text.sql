-- influence_with_text: scores (with influence_normalized's n_scored, share and percentile)
-- joined with the chunk's text and the query's prompt/completion.
CREATE OR REPLACE VIEW influence_with_text AS
SELECT i.*,
       c.chunk_index, c.n_chunks, c.text AS chunk_text,
       q.prompt, q.completion
FROM influence_normalized AS i
LEFT JOIN chunks AS c ON c.shard = i.shard AND c.chunk_id = i.chunk_id
LEFT JOIN queries AS q ON q.query_id = i.query_id;
