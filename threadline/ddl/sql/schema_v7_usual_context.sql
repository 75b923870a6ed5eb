-- The usual context's fast path, shared by insert_transaction_row(bigint) and the capture code
-- (which holds it inline, saving a function call per audited transaction). Variables: raw (the
-- context text), j (jsonb), tx (the row's id, allocated by next_transaction_id()), marker (text).
-- @returned@ is what the caller returns once the row is written. The generated copies carry no
-- comment: a capture function is compiled again by each new session, and its length costs there.
--
-- The usual context first: no backslash (so no escape sequence), no character an id may not
-- hold and no array (so the path below never unwraps one), so only its shape is left to check,
-- in a path where (!exists($.x) || $.x > "") holds for no key at all or a non-empty string, and
-- not for null, the empty string or a value of another type (a null id is left to the complete
-- checks, which refuse it; a null inside job or meta is kept). This path is written twice: for a text of at most 275 bytes,
-- whose strings cannot be longer than 256 characters, and for a longer one (a Celery task's
-- context, with its job), whose ids are measured as well; the second comes after the first has
-- returned, so the usual transaction never pays the set-up of its expressions. Anything else
-- takes the complete checks, which name what was wrong; so does a context that carries
-- incoming_error (the application refused one it received: rare), which spares every usual
-- transaction a path step and the context_error expression (about 2,900 instructions).
    IF raw <> '' AND @size@ AND raw !~ E'[[\\\\\\u007f-\\u009f\\u061c\\u200e\\u200f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069]' THEN
        BEGIN
            j := raw::jsonb;
        EXCEPTION WHEN invalid_text_representation OR untranslatable_character OR feature_not_supported
                       OR numeric_value_out_of_range OR character_not_in_repertoire
                       OR statement_too_complex OR program_limit_exceeded THEN
            j := NULL;
        END;
        IF jsonb_typeof(j) = 'object'
           AND (j - '{v,actor,correlation_id,request_id,causation_id,origin,job,meta}'::text[]) = '{}'::jsonb
           AND jsonb_path_match(j, '$.v == 1 && (!exists($.correlation_id) || $.correlation_id > "") && (!exists($.request_id) || $.request_id > "") && (!exists($.causation_id) || $.causation_id > "") && (!exists($.origin) || $.origin > "") && !($.job.type() != "object") && !($.meta.type() != "object") && (!exists($.actor) || ($.actor.type() == "object" && $.actor.type like_regex "^[a-z][a-z0-9_]*$" && (!exists($.actor.id) || $.actor.id > "") && (!exists($.actor.display) || $.actor.display > "") && (exists($.actor.id) || $.actor.type == "anonymous")))', '{}', true)
           AND (NOT j ? 'actor' OR (((j -> 'actor') - '{type,id,display}'::text[]) = '{}'::jsonb
                                    AND length(j -> 'actor' ->> 'type') <= 32))@lengths@ THEN
            INSERT INTO @audit@.transactions
                (id, actor, correlation_id, request_id, causation_id, origin, job, meta)
            OVERRIDING SYSTEM VALUE
            VALUES (tx, j -> 'actor', j ->> 'correlation_id', j ->> 'request_id', j ->> 'causation_id',
                    j ->> 'origin', j -> 'job', j -> 'meta');
            marker := set_config('threadline.txctx_@audit_name@', '=' || tx || '|' || raw, true);
            RETURN @returned@;
        END IF;
        j := NULL;
    END IF;
