-- The sample database behind the gateways: a table, and a login role that pam
-- holds the password of (`pam account add app app_reader --username app_reader`).
CREATE TABLE greetings (id serial PRIMARY KEY, text text NOT NULL);
INSERT INTO greetings (text) VALUES ('hello from behind pam'), ('every statement is on record');
CREATE ROLE app_reader LOGIN PASSWORD 'sample-reader-password';
GRANT CONNECT ON DATABASE app TO app_reader;
GRANT SELECT ON greetings TO app_reader;
