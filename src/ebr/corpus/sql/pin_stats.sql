-- Per-signature engagement statistics as of {{as_of_us}}: counts per positive action over the last
-- 7, 30 and 90 days, at the coarse image-signature granularity (the serving corpus's), so that
-- training and serving features aggregate the same pins.
SELECT COALESCE(p.image_sig_coarse, p.image_sig, e.pin_id) AS image_sig_coarse,
{{count_columns}}
FROM engagements e
JOIN pins p ON p.pin_id = e.pin_id
WHERE e.ts IS NOT NULL
  AND unix_micros(e.ts) < {{as_of_us}}
  AND unix_micros(e.ts) >= {{as_of_us}} - {{max_window_us}}
GROUP BY COALESCE(p.image_sig_coarse, p.image_sig, e.pin_id)
