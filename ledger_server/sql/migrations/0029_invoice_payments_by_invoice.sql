-- The payments of an invoice (payments_reaching): every paid invoice, checkout, invoice
-- payment and plan change now looks them up to wake the refunds handled before it
-- (helper-96); by the primary key (payment first) that was a scan of the whole table.
CREATE INDEX invoice_payments_by_invoice ON invoice_payments (invoice_ref);
