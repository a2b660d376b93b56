-- A 10-table template, the shape of a small SaaS app: serial keys, foreign
-- keys, secondary indexes, CHECKs, grants.
\set QUIET on
GRANT USAGE ON SCHEMA levqor_template TO levqor_app;
CREATE TABLE levqor_template.accounts (id serial PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE levqor_template.users (id serial PRIMARY KEY, account_id int NOT NULL REFERENCES levqor_template.accounts (id),
    email text NOT NULL UNIQUE, role text NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'member')));
CREATE TABLE levqor_template.projects (id serial PRIMARY KEY, account_id int NOT NULL REFERENCES levqor_template.accounts (id), name text NOT NULL);
CREATE TABLE levqor_template.tasks (id bigserial PRIMARY KEY, project_id int NOT NULL REFERENCES levqor_template.projects (id) ON DELETE CASCADE,
    title text NOT NULL, done boolean NOT NULL DEFAULT false);
CREATE INDEX ON levqor_template.tasks (project_id, done);
CREATE TABLE levqor_template.comments (id bigserial PRIMARY KEY, task_id bigint NOT NULL REFERENCES levqor_template.tasks (id) ON DELETE CASCADE,
    user_id int REFERENCES levqor_template.users (id), body text NOT NULL);
CREATE TABLE levqor_template.labels (id serial PRIMARY KEY, name text NOT NULL UNIQUE);
CREATE TABLE levqor_template.task_labels (task_id bigint REFERENCES levqor_template.tasks (id) ON DELETE CASCADE,
    label_id int REFERENCES levqor_template.labels (id), PRIMARY KEY (task_id, label_id));
CREATE TABLE levqor_template.files (id bigserial PRIMARY KEY, project_id int REFERENCES levqor_template.projects (id), path text NOT NULL, bytes bigint NOT NULL CHECK (bytes >= 0));
CREATE TABLE levqor_template.settings (key text PRIMARY KEY, value jsonb NOT NULL DEFAULT '{}');
CREATE TABLE levqor_template.events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, kind text NOT NULL, at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON levqor_template.events (at);
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA levqor_template TO levqor_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA levqor_template TO levqor_app;
