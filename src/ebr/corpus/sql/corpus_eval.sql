-- Corpus coverage: the share of positive engagements in [as_of, as_of + horizon) whose pin, or a
-- duplicate of it (same coarse image signature), is in the corpus.
WITH future AS (
  SELECT COALESCE(p.image_sig_coarse, p.image_sig, e.pin_id) AS sig
  FROM engagements e
  LEFT JOIN pins p ON p.pin_id = e.pin_id
  WHERE e.ts IS NOT NULL
    AND unix_micros(e.ts) >= {{as_of_us}}
    AND unix_micros(e.ts) < {{as_of_us}} + {{horizon_us}}
    AND e.action IN ({{positive_actions}})
)
SELECT COUNT(*) AS positives,
       SUM(CASE WHEN c.image_sig_coarse IS NOT NULL THEN 1 ELSE 0 END) AS covered
FROM future f
LEFT JOIN (SELECT DISTINCT image_sig_coarse FROM corpus) c ON c.image_sig_coarse = f.sig
