-- A redemption batch may be made for the accounts of one tenant only: the accounts whose
-- id starts with its account_prefix (NULL: any account). A service scoped to another
-- prefix, or any caller naming an account outside it, finds the batch's codes unknown
-- (helper-71: a scoped service could redeem any tenant's codes).
ALTER TABLE redemption_batches
    ADD COLUMN account_prefix text,
    ADD CONSTRAINT redemption_batches_account_prefix_format
        CHECK (account_prefix IS NULL OR account_prefix ~ '^[A-Za-z0-9._:@/+=-]{1,128}$');
