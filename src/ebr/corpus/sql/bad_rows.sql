-- Rows the corpus does not use, counted (never silently dropped): engagements whose pin is not in
-- the pins table, engagements at or after as_of, engagements without a timestamp, and actions
-- with no weight (impressions, hides unless weighted).
SELECT
  SUM(CASE WHEN p.pin_id IS NULL THEN 1 ELSE 0 END) AS unknown_pins,
  SUM(CASE WHEN e.ts IS NOT NULL AND unix_micros(e.ts) >= {{as_of_us}} THEN 1 ELSE 0 END) AS after_as_of,
  SUM(CASE WHEN e.ts IS NULL THEN 1 ELSE 0 END) AS without_timestamp,
  SUM(CASE WHEN {{weight_expr}} = 0 THEN 1 ELSE 0 END) AS unweighted_actions,
  SUM(CASE WHEN e.ts IS NOT NULL AND unix_micros(e.ts) < {{window_start_us}} THEN 1 ELSE 0 END) AS before_window,
  COUNT(*) AS engagements
FROM engagements e
LEFT JOIN (SELECT DISTINCT pin_id FROM pins) p ON p.pin_id = e.pin_id
