-- A model multiplier can be withdrawn, as a price can (prices.active): the newest version
-- with active = false leaves the model without one. Until now a multiplier, once set, could
-- only be changed (setting it to 0 makes the model free), so after a model's own price was
-- removed the model was still charged the feature-wide price times its multiplier, with no
-- way to stop it (helper-88). Versions written before are all in force (true).
ALTER TABLE model_multipliers ADD COLUMN active boolean NOT NULL DEFAULT true;
