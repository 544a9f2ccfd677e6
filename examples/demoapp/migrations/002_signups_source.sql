-- Expand: where a sign-up came from. Nullable, so the release before this one (which does not
-- know the column) keeps inserting while the new one rolls out.
alter table signups add column if not exists source text;
