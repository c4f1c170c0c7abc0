-- The serving corpus, run unchanged by DuckDB and Spark SQL (placeholders {{...}} are filled by
-- ebr.corpus.engine with literals; unix_micros is a built-in of Spark and a macro in DuckDB).
--   1. window filter: engagements with as_of - window <= ts < as_of and a weighted action;
--   2. time-decayed weighted score per pin: sum of w(action) * 2^(-(as_of - ts) / half_life);
--   3. remap fine image signatures to coarse ones;
--   4. one representative pin per coarse signature (highest score, ties by pin id), carrying the
--      group's score;
--   5. top N by score, ties by pin id.
WITH windowed AS (
  SELECT e.pin_id,
         {{weight_expr}} AS w,
         CAST(unix_micros(e.ts) AS DOUBLE) AS t
  FROM engagements e
  WHERE e.ts IS NOT NULL
    AND unix_micros(e.ts) < {{as_of_us}}
    AND unix_micros(e.ts) >= {{window_start_us}}
),
pin_scores AS (
  SELECT pin_id,
         SUM(w * {{decay_expr}}) AS score,
         COUNT(*) AS n_engagements
  FROM windowed
  WHERE w > 0
  GROUP BY pin_id
),
remapped AS (
  SELECT s.pin_id, s.score, s.n_engagements,
         COALESCE(p.image_sig_coarse, p.image_sig, s.pin_id) AS image_sig_coarse
  FROM pin_scores s
  JOIN pins p ON p.pin_id = s.pin_id
),
ranked AS (
  SELECT pin_id, image_sig_coarse, score, n_engagements,
         SUM(score) OVER (PARTITION BY image_sig_coarse) AS group_score,
         SUM(n_engagements) OVER (PARTITION BY image_sig_coarse) AS group_engagements,
         COUNT(*) OVER (PARTITION BY image_sig_coarse) AS group_pins,
         ROW_NUMBER() OVER (PARTITION BY image_sig_coarse ORDER BY score DESC, pin_id) AS rk
  FROM remapped
)
SELECT pin_id, image_sig_coarse, group_score AS score, score AS pin_score,
       group_engagements AS n_engagements, group_pins
FROM ranked
WHERE rk = 1
ORDER BY group_score DESC, pin_id
LIMIT {{top_n}}
