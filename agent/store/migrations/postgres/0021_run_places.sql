-- Where a run tree's messages live in a chat, keyed by the root run and the chat (a run speaks
-- in its own chat, and may write to a person's private chat too): the forum topic the bot
-- opened for it (`thread_id`; `closed_at` once the bot closed it when the run ended), or, in a
-- chat without topics, the run's first message there (`first_message_id`), which its later
-- messages reply to. A row is written before anything is sent into its topic, so a restarted
-- bot finds the topic instead of opening a second one. A run started inside a topic a person
-- opened has no row: its messages go where it started.
CREATE TABLE run_places (
    root_id          TEXT NOT NULL,
    chat_id          BIGINT NOT NULL,
    thread_id        BIGINT,
    first_message_id BIGINT,
    created_at       DOUBLE PRECISION NOT NULL,
    closed_at        DOUBLE PRECISION,
    PRIMARY KEY (root_id, chat_id)
);
