-- The sign-ups table as the first releases made it (create if missing: they made it at start).
create table if not exists signups (
    id serial primary key,
    email text not null,
    served_by text not null,
    at timestamptz not null default now()
);
