-- top_k: the 10 most influential chunks per (model pair, query, method, damping).
CREATE OR REPLACE VIEW top_k AS
SELECT *
FROM influence_with_text
WHERE rank <= 10;
